"""GenEval plumbing: mmdet-style Mask2Former post-processing on hand-made logits, tiny transformers detectors and the
CLIP colour classifier (masked crop over grey), and the reward end to end. Tiny models: plumbing, not accuracy."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import rewards.geneval as geneval
from rewards.base import RewardBatch
from rewards.geneval import (COLORS, OBJECT_NAMES, ClipColorClassifier, Detection, GenEvalReward,
                             TransformersDetector, mask2former_instances)


def test_mask2former_instances_boxes_masks_scores():
    # 2 queries, 3 classes (+ no object). Query 0 is confidently class 1 with a mask on a known square.
    class_logits = torch.tensor([[0.0, 10.0, 0.0, 0.0], [0.0, 0.0, 0.0, 10.0]])
    mask_logits = torch.full((2, 8, 8), -20.0)
    mask_logits[0, 2:4, 1:3] = 20.0  # 1/4 resolution of a 32 x 32 padded input
    labels, boxes, masks, scores = mask2former_instances(class_logits, mask_logits, (32, 32), (32, 32), (32, 32),
                                                         max_per_image=6)
    assert labels.shape == (6,) and masks.shape == (6, 32, 32) and masks.dtype == torch.bool
    best = int(scores.argmax())
    assert int(labels[best]) == 1
    m = masks[best]
    ys, xs = torch.where(m)
    assert boxes[best].tolist() == [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    assert 3 <= xs.min() <= 5 and 7 <= ys.min() <= 9  # the square scaled x4 (bilinear edges)
    p_class = torch.softmax(class_logits[0], -1)[1]
    # class probability x mean mask probability inside the mask (~1 but for the bilinear edge pixels)
    assert 0.95 * float(p_class) < float(scores[best]) <= float(p_class)
    # min_score drops pairs before their masks are made; with it above every probability nothing is left.
    labels3, boxes3, masks3, scores3 = mask2former_instances(class_logits, mask_logits, (32, 32), (32, 32), (32, 32),
                                                             6, min_score=0.5)
    assert labels3.tolist() == [1] and masks3.shape == (1, 32, 32) and torch.equal(masks3[0], m)
    empty = mask2former_instances(class_logits, mask_logits, (32, 32), (32, 32), (40, 50), 6, min_score=1.0)
    assert [tuple(t.shape) for t in empty] == [(0,), (0, 4), (0, 40, 50), (0,)]
    # Padding is cropped before resizing to the original size: valid 16 x 32 of a 32 x 32 input -> 64 x 128 image.
    _, boxes2, masks2, _ = mask2former_instances(class_logits, mask_logits, (32, 32), (16, 32), (64, 128), 6)
    assert masks2.shape == (6, 64, 128)
    assert boxes2[best, 1] == pytest.approx(4 * boxes[best, 1], abs=4)


@pytest.mark.parametrize("kind", ["mask2former", "detr"])
def test_tiny_detector_outputs(tiny_models, kind, monkeypatch):
    monkeypatch.setattr(geneval, "THRESHOLD", 0.0)  # a random tiny detector is never confident
    det = TransformersDetector(tiny_models[kind], batch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (96, 128, 3), dtype=np.uint8), rng.integers(0, 255, (80, 80, 3), dtype=np.uint8),
              rng.integers(0, 255, (64, 100, 3), dtype=np.uint8)]
    out = det.detect(images)
    assert len(out) == 3
    for image, dets in zip(images, out):
        assert dets, "the tiny detector returns unfiltered candidates"
        h, w = image.shape[:2]
        for name, box, score, mask in dets:
            assert name in OBJECT_NAMES and 0.0 <= score <= 1.0
            assert -1e-3 <= box[0] <= box[2] <= w + 1e-3 and -1e-3 <= box[1] <= box[3] <= h + 1e-3
            if kind == "mask2former":
                assert mask.shape == (h, w) and mask.dtype == bool
            else:
                assert mask is None


def test_clip_color_crop_over_grey_and_classes(tiny_models):
    clf = ClipColorClassifier(tiny_models["clip"])
    image = np.zeros((40, 60, 3), np.uint8)
    image[:, :, 0] = 255  # all red
    mask = np.zeros((40, 60), bool)
    mask[10:20, 10:30] = True
    crop = np.asarray(clf.crops(image, [Detection([5, 5, 35, 25], 0.9, mask)])[0])
    assert crop.shape == (20, 30, 3)
    assert (crop[5:15, 5:25] == [255, 0, 0]).all()  # inside the mask: the image
    assert (crop[0, 0] == [0x99, 0x99, 0x99]).all()  # outside: flat #999999
    boxonly = np.asarray(clf.crops(image, [Detection([5, 5, 35, 25], 0.9)])[0])
    assert (boxonly == [255, 0, 0]).all()  # no mask: the box of the image itself
    degenerate = clf.crops(image, [Detection([5, 5, 5, 5], 0.9)])[0]
    assert degenerate.size == (1, 1)
    colors = clf.classify(image, "car", [Detection([5, 5, 35, 25], 0.9, mask), Detection([0, 0, 60, 40], 0.8)])
    assert len(colors) == 2 and set(colors) <= set(COLORS)
    t = clf.text_classifier("car")
    assert t.shape == (16, 10) and torch.allclose(t.norm(dim=0), torch.ones(10), atol=1e-5)
    assert clf.text_classifier("car") is t  # cached per class


def test_geneval_reward_end_to_end(tiny_models, monkeypatch):
    reward = GenEvalReward.from_paths(tiny_models["mask2former"], tiny_models["clip"], batch_size=2)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 255, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    metas = [{"tag": "single_object", "include": [{"class": "dog", "count": 1}]},
             {"tag": "colors", "include": [{"class": "dog", "count": 1, "color": "red"}]},
             {"tag": "colors"}]  # malformed: fails alone
    batch = RewardBatch(images, ["a dog", "a red dog", "x"], ["geneval"] * 3, metas)
    # A random tiny detector is never confident: every object is missing.
    out = reward.score(batch)
    assert out.scores[0] == 0.0 and out.scores[1] == 0.0 and math.isnan(out.scores[2])
    assert out.errors[2].startswith("ValueError") and out.extras["correct"][0] == 0.0
    # With the threshold at 0 every candidate counts and colours are classified by CLIP.
    monkeypatch.setattr(geneval, "THRESHOLD", 0.0)
    seen = []
    orig = reward.color_classifier.classify
    monkeypatch.setattr(reward.color_classifier, "classify", lambda im, c, d: seen.append(c) or orig(im, c, d))
    raw = reward.detector.detect(images[:1])[0]
    name = max(raw, key=lambda r: r[2])[0]
    metas = [{"tag": "colors", "include": [{"class": name, "count": 1, "color": "red"}]}]
    out = reward.score(RewardBatch(images[:1], ["x"], ["geneval"], metas))
    assert not math.isnan(out.scores[0]) and seen == [name]
