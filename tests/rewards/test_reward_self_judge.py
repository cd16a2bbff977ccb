"""self_judge on the tiny policy: the score is P(yes) / (P(yes) + P(no)) of the first answer token that
``text_logits`` gives for the question with the sample's own bits as the image, whatever else shares the batch;
per-task questions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rewards.base import PackedBits, RewardBatch
from rewards.self_judge import SelfJudgeReward
from uniar_ray.bits import BitsFile, pack_bits
from uniar_ray.config import RewardSpec
from uniar_ray.model.chat import ChatProcessor


@pytest.fixture(scope="module")
def judge():
    return SelfJudgeReward.from_spec(RewardSpec(kind="self_judge", model_path="tiny", batch_size=8,
                                                questions={"ocr": 'Can you read "{prompt}" here?'}))


def _sample(seed: int, h: int = 64, w: int = 64) -> PackedBits:
    n = (h // 32) * (w // 32)
    bits = (np.random.default_rng(seed).random((n, 4, 4, 64)) < 0.5).astype(np.uint8)
    return PackedBits(pack_bits(bits), bits.shape, h, w)


def _by_hand(policy, question: str, bits: PackedBits) -> float:
    """The same question through the chat template, the bits as the image, one row: text_logits' last position."""
    tok = policy.tokenizer
    v = policy.config.vision_config
    inputs = ChatProcessor(tok, tok.chat_template, None, v.spatial_merge_size, v.patch_size)(
        [question], bits=[BitsFile(torch.from_numpy(np.unpackbits(bits.packed)[:int(np.prod(bits.shape))]
                                                    .reshape(bits.shape)), bits.ar_height, bits.ar_width, "")])
    probs = torch.softmax(policy.text_logits(**inputs.model_kwargs())[0, -1].double(), -1)
    first = lambda word: tok.encode(word, add_special_tokens=False)[0]  # noqa: E731
    yes, no = probs[[first("yes"), first("Yes")]].sum(), probs[[first("no"), first("No")]].sum()
    return float(yes / (yes + no))


def test_score_is_the_yes_share_of_text_logits_on_the_same_bits(judge, tiny_policy):
    prompts = ["a red apple", "a poster that says HELLO in big letters", "x", "two dogs"]
    tasks = ["general", "ocr", None, "geneval"]
    bits = [_sample(0), _sample(1), _sample(2, 96, 64), _sample(3)]
    out = judge.score(RewardBatch([None] * 4, prompts, tasks, [{}] * 4, bits))
    assert out.errors == [None] * 4
    questions = ['Does this image show "a red apple"? Answer yes or no.', 'Can you read "a poster that says HELLO '
                 'in big letters" here?', 'Does this image show "x"? Answer yes or no.',
                 'Does this image show "two dogs"? Answer yes or no.']
    assert [judge.question_for(p, t) for p, t in zip(prompts, tasks)] == questions
    for i in range(4):
        assert out.scores[i] == pytest.approx(_by_hand(tiny_policy, questions[i], bits[i]), abs=1e-6)
    assert len({round(s, 6) for s in out.scores}) == 4  # the bits and the question matter
    np.testing.assert_allclose(out.scores, out.extras["p_yes"] / (out.extras["p_yes"] + out.extras["p_no"]))


def test_score_does_not_depend_on_the_rest_of_the_batch(judge):
    target = _sample(7)
    alone = judge.score(RewardBatch([None], ["a cat"], [None], [{}], [target])).scores[0]
    for others in ([_sample(8)], [_sample(9, 128, 96), _sample(10)]):
        mixed = judge.score(RewardBatch([None] * (1 + len(others)), ["a long prompt with many more words"] *
                                        len(others) + ["a cat"], [None] * (1 + len(others)),
                                        [{}] * (1 + len(others)), others + [target]))
        assert mixed.scores[-1] == pytest.approx(alone, abs=1e-6)


def test_bits_only(judge):
    with pytest.raises(ValueError, match="reads bits"):
        judge.score(RewardBatch([np.zeros((8, 8, 3), np.uint8)], ["a"], [None], [{}]))
