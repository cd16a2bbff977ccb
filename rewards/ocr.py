"""OCR reward (spec §7.5): RapidOCR reads the image, ``text_similarity`` compares what it read with the prompt's
quoted text. Routed to ``task == "ocr"`` samples; RapidOCR's ONNX models ship in its wheel, so this runs anywhere.

    text_similarity('a sign that says "Hello World"', "HELLO W0RLD")   # 1 - capped Levenshtein / len = 0.9
"""
from __future__ import annotations

import logging
import os
import re
import threading

import numpy as np

from rewards.base import RewardBatch, RewardScores

logger = logging.getLogger(__name__)

_QUOTED = re.compile(r'"([^"]*)"')  # straight double quotes only, as the reference


def quoted_text(prompt: str) -> str | None:
    """All spans between straight double quotes, joined with one space; None when the prompt has none."""
    spans = _QUOTED.findall(prompt)
    return " ".join(spans) if spans else None


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insert, delete, substitute; unit costs)."""
    if len(a) < len(b):
        a, b = b, a
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def _normalise(text: str) -> str:
    return text.replace(" ", "").lower()  # U+0020 only, as the reference


def text_similarity(prompt: str, ocr_text: str) -> float:
    """1 - min(Levenshtein(read, target), len(target)) / len(target), both with spaces removed and lower-cased;
    target = the prompt's quoted text. 0 when there is nothing to compare against: no quotes (the reference's 0.0),
    or quoted text that is empty or only spaces (the reference divides by zero there), with a warning."""
    target = quoted_text(prompt)
    if target is None:
        logger.warning("ocr reward: prompt has no quoted text, scoring 0: %.80r", prompt)
        return 0.0
    target = _normalise(target)
    if not target:
        logger.warning("ocr reward: quoted text is empty or only spaces, scoring 0: %.80r", prompt)
        return 0.0
    dist = min(levenshtein(_normalise(ocr_text), target), len(target))
    return 1.0 - dist / len(target)


class OcrReward:
    """RapidOCR (PP-OCRv4 det + rec ONNX models, CPU) + ``text_similarity``.

    Follows the reference's PaddleOCR set-up where it matters: no orientation classifier, every recognised line with
    confidence > 0 kept, lines concatenated with no separator in reading order. Images are handed over as BGR, the
    order the OCR expects (the reference hands PaddleOCR RGB arrays). An OCR exception fails the sample (NaN and the
    reason) where the reference scores 0."""

    name = "ocr"
    tasks = frozenset({"ocr"})

    def __init__(self, engine=None):
        if engine is None:
            from rapidocr_onnxruntime import RapidOCR

            # Threads: the process's CPU share (Ray sets OMP_NUM_THREADS per actor); onnxruntime would otherwise
            # start one spinning thread per core and fight the other rewards on the same machine.
            threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or -1
            engine = RapidOCR(use_cls=False, text_score=1e-9, print_verbose=False, intra_op_num_threads=threads,
                              inter_op_num_threads=1)
        self.engine = engine
        self._lock = threading.Lock()  # one onnxruntime session set; calls from threads are serialised

    def read(self, image: np.ndarray) -> str:
        """All text RapidOCR finds in an [H, W, 3] uint8 RGB image, concatenated."""
        with self._lock:
            result, _ = self.engine(np.ascontiguousarray(image[:, :, ::-1]))
        if not result:
            return ""
        return "".join(text for _box, text, conf in result if float(conf) > 0)

    def score(self, batch: RewardBatch) -> RewardScores:
        scores = np.full(len(batch), np.nan)
        errors: list[str | None] = [None] * len(batch)
        for i, (image, prompt) in enumerate(zip(batch.images, batch.prompts)):
            target = quoted_text(prompt)
            if target is None or not _normalise(target):
                scores[i] = text_similarity(prompt, "")  # 0 with a warning; no OCR run, as the reference
                continue
            try:
                scores[i] = text_similarity(prompt, self.read(image))
            except Exception as e:  # noqa: BLE001
                errors[i] = f"OCR failed: {type(e).__name__}: {e}"
        return RewardScores(scores, errors)
