"""VLM-judge reward (UnifiedReward prompt, spec §7.3): a Qwen-VL judge rates alignment, coherence and style 1-5;
reward = (0.4 a + 0.4 c + 0.2 s) / 5. Every sample is scored; requests are batched.

Two backends behind ``JudgeBackend.generate(images, prompts) -> replies``: ``TransformersJudge`` (CPU or GPU, any
transformers Qwen-VL folder) and ``VLLMJudge`` (GPU machines; vLLM's Qwen-VL code needs torchvision, so not on the
CPU machines). ``parse_judge_reply`` reads messy replies.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from rewards.base import RewardBatch, RewardScores

# The reference's prompt, verbatim (train/rl/reward_funcs.py::unified_reward).
JUDGE_TEMPLATE = (
    "You are presented with a generated image and its associated text caption. "
    "Your task is to analyze the image across multiple dimensions in relation to the caption. Specifically:\n"
    "Provide overall assessments for the image along the following axes (each rated from 1 to 5):\n"
    "- Alignment Score: How well the image matches the caption in terms of content.\n"
    "- Coherence Score: How logically consistent the image is (absence of visual glitches, object distortions, "
    "etc.).\n"
    "- Style Score: How aesthetically appealing the image looks, regardless of caption accuracy.\n\n"
    "Output your evaluation using the format below:\n\n"
    "Alignment Score (1-5): X\n"
    "Coherence Score (1-5): Y\n"
    "Style Score (1-5): Z\n\n"
    "Your task is provided as follows:\n"
    "Text Caption: [{caption}]"
)
WEIGHTS = {"alignment": 0.4, "coherence": 0.4, "style": 0.2}
# "<Key> Score", anything but a separator (e.g. "(1-5)", "**"), then ':' / '=' / full-width colon, optional markdown
# emphasis, then the number. "-" is no separator: "(1-5)" would otherwise read as a score of 5.
_SCORE_RE = {key: re.compile(rf"{key}\s*score[^:=：\n]*?[:=：]\s*[*_`\[\s]*([-+]?\d+(?:\.\d+)?)", re.IGNORECASE)
             for key in WEIGHTS}


def judge_prompt(caption: str) -> str:
    return JUDGE_TEMPLATE.format(caption=caption)


@dataclasses.dataclass
class JudgeScores:
    alignment: float | None
    coherence: float | None
    style: float | None

    def reward(self, missing: str = "nan") -> float:
        """Weighted, / 5. A missing score makes the reward NaN (``missing="nan"``) or counts as 0, the reference's
        rule (``missing="zero"``: an unparsable reply scores 0)."""
        values = dataclasses.asdict(self)
        if any(v is None for v in values.values()) and missing == "nan":
            return math.nan
        return sum(WEIGHTS[k] * (v or 0.0) for k, v in values.items()) / 5.0


def parse_judge_reply(text: str) -> JudgeScores:
    """The last "<Key> Score ...: number" of each key (a reasoning judge may mention a key before its verdict),
    clamped to [1, 5]. Tolerates markdown emphasis, "(1-5)" annotations, "4/5", "4.5", any letter case; a key
    whose score is not a number (e.g. the template's "X") is missing."""
    found = {}
    for key, pattern in _SCORE_RE.items():
        matches = pattern.findall(text or "")
        found[key] = min(5.0, max(1.0, float(matches[-1]))) if matches else None
    return JudgeScores(**found)


class JudgeBackend(Protocol):
    def generate(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[str]:
        """One reply per (image, prompt), in order; greedy decoding."""
        ...


class JudgeReward:
    name = "judge"
    tasks = None

    def __init__(self, backend: JudgeBackend, missing: str = "zero"):
        self.backend, self.missing = backend, missing

    @classmethod
    def from_spec(cls, spec) -> JudgeReward:
        if spec.backend == "vllm":
            backend: JudgeBackend = VLLMJudge(spec.model_path, spec.max_new_tokens,
                                              tensor_parallel_size=max(1, int(spec.num_gpus)),
                                              trust_remote_code=spec.trust_remote_code)
        else:
            backend = TransformersJudge(spec.model_path, spec.device, spec.dtype, spec.batch_size,
                                        spec.max_new_tokens, trust_remote_code=spec.trust_remote_code)
        return cls(backend, spec.missing_score)

    def score(self, batch: RewardBatch) -> RewardScores:
        replies = self.backend.generate(batch.images, [judge_prompt(p) for p in batch.prompts])
        if len(replies) != len(batch):
            raise RuntimeError(f"judge returned {len(replies)} replies for {len(batch)} requests")
        scores = np.full(len(batch), math.nan)
        errors: list[str | None] = [None] * len(batch)
        parsed = {"alignment": [], "coherence": [], "style": []}
        for i, reply in enumerate(replies):
            js = parse_judge_reply(reply)
            scores[i] = js.reward(self.missing)
            for k, v in dataclasses.asdict(js).items():
                parsed[k].append(math.nan if v is None else v)
            if math.isnan(scores[i]):
                errors[i] = f"unparsable judge reply: {reply[:200]!r}"
        return RewardScores(scores, errors, {k: np.asarray(v) for k, v in parsed.items()})


# ----------------------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------------------

# Qwen2/2.5-VL's template for one user turn with one image, used when the folder ships no chat template.
_QWEN_VL_FALLBACK = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                     "<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")
IMAGE_PAD = "<|image_pad|>"


class TransformersJudge:
    """Greedy generation with transformers' Qwen-VL models (Qwen2-VL, Qwen2.5-VL, Qwen3-VL), batched with left
    padding. Uses the tokenizer and the PIL image processor directly and expands the image placeholder itself:
    transformers' Qwen-VL *processor* insists on a video processor, which needs torchvision."""

    def __init__(self, path: str, device: str = "cpu", dtype: str = "float32", batch_size: int = 8,
                 max_new_tokens: int = 4096, trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForImageTextToText, AutoTokenizer

        from rewards.clip import DTYPES, load_image_processor

        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left", trust_remote_code=trust_remote_code)
        self.image_processor = load_image_processor(path)
        self.model = AutoModelForImageTextToText.from_pretrained(path, dtype=DTYPES[dtype],
                                                                 trust_remote_code=trust_remote_code).to(device).eval()
        self.template = _chat_template(Path(path), self.tokenizer)
        self.device, self.batch_size, self.max_new_tokens = torch.device(device), batch_size, max_new_tokens

    def _text(self, prompt: str, grid) -> str:
        if self.template is None:
            text = _QWEN_VL_FALLBACK.format(text=prompt)
        else:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
            text = self.tokenizer.apply_chat_template(msgs, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
        if text.count(IMAGE_PAD) != 1:
            raise ValueError(f"chat template produced {text.count(IMAGE_PAD)} image placeholders, expected 1")
        return text.replace(IMAGE_PAD, IMAGE_PAD * (int(grid.prod()) // self.image_processor.merge_size ** 2))

    def generate(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[str]:
        import torch
        from PIL import Image

        replies: list[str] = []
        for s in range(0, len(images), self.batch_size):
            chunk = [Image.fromarray(im) for im in images[s:s + self.batch_size]]
            vis = self.image_processor(images=chunk, return_tensors="pt")
            texts = [self._text(p, g) for p, g in zip(prompts[s:s + self.batch_size], vis["image_grid_thw"])]
            enc = self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=enc["input_ids"].to(self.device), attention_mask=enc["attention_mask"].to(self.device),
                    pixel_values=vis["pixel_values"].to(self.device, self.model.dtype),
                    image_grid_thw=vis["image_grid_thw"].to(self.device),
                    max_new_tokens=self.max_new_tokens, do_sample=False)
            replies.extend(self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return replies


def _chat_template(folder: Path, tokenizer) -> str | None:
    """The folder's chat template: chat_template.jinja / chat_template.json (processor-level, newer checkpoints)
    or the tokenizer's own; None when there is none."""
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text()
    if (folder / "chat_template.json").exists():
        return json.loads((folder / "chat_template.json").read_text())["chat_template"]
    return getattr(tokenizer, "chat_template", None) or None


class VLLMJudge:
    """vLLM offline engine on GPU (the reference serves the UnifiedReward Qwen-VL judge with ``vllm serve``; here
    the engine lives in the reward actor, no HTTP). One ``LLM.chat`` call per batch: vLLM batches internally.
    Images go in as PIL, after the reward actor's JPEG round trip (quality 95 by default, as the reference sent
    them). ``trust_remote_code`` only when the config asks (``rewards.models.judge.trust_remote_code``). Not
    runnable on the CPU machines."""

    def __init__(self, path: str, max_new_tokens: int = 4096, tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.8, max_model_len: int | None = 8192,
                 trust_remote_code: bool = False):
        from vllm import LLM, SamplingParams  # GPU machines only

        self.llm = LLM(model=path, trust_remote_code=trust_remote_code, tensor_parallel_size=tensor_parallel_size,
                       gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                       limit_mm_per_prompt={"image": 1}, enable_prefix_caching=True)
        self.params = SamplingParams(temperature=0.0, max_tokens=max_new_tokens)

    def generate(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[str]:
        from PIL import Image

        conversations = [[{"role": "user", "content": [{"type": "image_pil", "image_pil": Image.fromarray(im)},
                                                        {"type": "text", "text": p}]}]
                         for im, p in zip(images, prompts)]
        outputs = self.llm.chat(conversations, self.params, use_tqdm=False)
        return [o.outputs[0].text for o in outputs]
