"""The model judges its own bits (``kind: self_judge``): a frozen UniAR policy reads each sample's generated bits
directly as the image in its context (``image_bits``: no decoding, no re-encoding) and scores

    P(yes) / (P(yes) + P(no))

of the first answer token to a templated question (default: does the image show the prompt?). P(yes) sums the
first token of "yes" and "Yes" (one token each in Qwen's vocabulary; the tiny test tokenizer spells words out, so
there it is the probability of an answer starting with y/Y), P(no) likewise. Batched (left padding), one forward
per ``batch_size`` samples; a sample's score does not depend on the others in its batch.

It measures what the policy's own understanding side believes about its picture: the model judging itself. Keep
the judge frozen (by default it is the KL reference, ``grpo.ref_model_path`` or ``model.path``; it never receives
the trainer's weights) and mix it with external rewards, or the policy can learn images that please its own
reading rather than people.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from rewards.base import PackedBits, RewardBatch, RewardScores
from uniar_ray.config.rewards import DEFAULT_QUESTION


def answer_token_ids(tokenizer, word: str) -> list[int]:
    """The first token of ``word`` and of ``word.capitalize()`` (distinct ids)."""
    ids = []
    for variant in dict.fromkeys((word, word.capitalize())):
        encoded = tokenizer.encode(variant, add_special_tokens=False)
        if encoded and encoded[0] not in ids:
            ids.append(encoded[0])
    if not ids:
        raise ValueError(f"the tokenizer encodes {word!r} to no token")
    return ids


class SelfJudgeReward:
    name = "self_judge"
    tasks = None
    inputs = "bits"

    def __init__(self, policy, chat_template: str, question: str = DEFAULT_QUESTION,
                 questions: dict[str, str] | None = None, batch_size: int = 16):
        from uniar_ray.model.chat import ChatProcessor

        if policy.tokenizer is None:
            raise ValueError("self_judge: the model folder has no tokenizer files")
        self.policy = policy.eval().requires_grad_(False)
        v = policy.config.vision_config
        self.processor = ChatProcessor(policy.tokenizer, chat_template, None, v.spatial_merge_size, v.patch_size)
        self.question, self.questions, self.batch_size = question, dict(questions or {}), batch_size
        self.yes_ids = answer_token_ids(policy.tokenizer, "yes")
        self.no_ids = answer_token_ids(policy.tokenizer, "no")
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(f"self_judge: 'yes' and 'no' start with the same token ({self.yes_ids}, {self.no_ids})")

    @classmethod
    def from_spec(cls, spec) -> SelfJudgeReward:
        from uniar_ray.model.chat import load_chat_template
        from uniar_ray.model.factory import load_policy
        from uniar_ray.model.loading import resolve_ar_folder

        if not spec.model_path:
            raise ValueError("self_judge needs model_path (in a GRPO run it defaults to grpo.ref_model_path, else "
                             "model.path)")
        policy = load_policy(spec.model_path, spec.dtype, spec.device, spec.tiny_seed)
        if spec.model_path == "tiny":
            template = policy.tokenizer.chat_template
        else:
            template = load_chat_template(Path(resolve_ar_folder(spec.model_path)), policy.tokenizer)
        return cls(policy, template, spec.question, spec.questions, spec.batch_size)

    def question_for(self, prompt: str, task: str | None) -> str:
        """The task's question (``questions[task]``, else ``question``) with ``{prompt}`` filled in."""
        return self.questions.get(task or "", self.question).replace("{prompt}", prompt)

    @torch.no_grad()
    def log_probabilities(self, bits: Sequence[PackedBits], questions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(log P(yes), log P(no)) [B] of the first answer token, one forward over the batch."""
        from uniar_ray.bits import BitsFile

        files = [BitsFile(b.unpack(), b.ar_height, b.ar_width, q) for b, q in zip(bits, questions)]
        return self.yes_no(self.processor(list(questions), bits=files))

    @torch.no_grad()
    def yes_no(self, inputs) -> tuple[np.ndarray, np.ndarray]:
        """(log P(yes), log P(no)) [B] of the first answer token for ``ChatInputs`` (bits or pixels: the pixel
        path is how ``perf/rewards.py`` compares this with decode + judging the pixels)."""
        logp = torch.log_softmax(self.policy.text_logits(**inputs.model_kwargs())[:, -1].double(), dim=-1)
        return (torch.logsumexp(logp[:, self.yes_ids], -1).cpu().numpy(),
                torch.logsumexp(logp[:, self.no_ids], -1).cpu().numpy())

    def score(self, batch: RewardBatch) -> RewardScores:
        if batch.bits is None:
            raise ValueError("self_judge reads bits, and the batch has none")
        n = len(batch)
        log_yes, log_no = np.full(n, math.nan), np.full(n, math.nan)
        questions = [self.question_for(p, t) for p, t in zip(batch.prompts, batch.tasks)]
        for s in range(0, n, self.batch_size):
            e = min(s + self.batch_size, n)
            log_yes[s:e], log_no[s:e] = self.log_probabilities(batch.bits[s:e], questions[s:e])
        # P(yes) / (P(yes) + P(no)) = sigmoid(log P(yes) - log P(no)): defined even when both are tiny
        scores = 1.0 / (1.0 + np.exp(log_no - log_yes))
        return RewardScores(scores, [None] * n, {"p_yes": np.exp(log_yes), "p_no": np.exp(log_no)})
