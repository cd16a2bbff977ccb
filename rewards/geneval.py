"""GenEval scoring (benchmarks_spec §2.3) and the reference's partial-credit RL reward (§7.4), detector-agnostic.

The rules are pure functions over detections (``relative_position``, ``filter_detections``, ``evaluate``,
``summarize``); ``GenEvalReward`` feeds them a transformers detector (Mask2Former or DETR family, local folder) and a
transformers CLIP colour classifier. No mmdet, no open_clip.

    res = evaluate(metadata, {"dog": [Detection([0, 0, 10, 10], 0.95, color="red")]})
    res.correct, res.score, res.reason
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from rewards.base import RewardBatch, RewardScores

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
THRESHOLD = 0.3  # detection confidence, strictly greater
COUNTING_THRESHOLD = 0.9  # for tag == "counting"
MAX_OBJECTS = 16  # per class, highest confidence first
NMS_THRESHOLD = 1.0  # 1.0 = no suppression (kept for documentation: overlapping boxes all count)
POSITION_THRESHOLD = 0.1
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
# The 80 COCO names in GenEval's object_names.txt order (also the reference reward server's copy).
OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant",
    "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange", "broccoli",
    "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet",
    "tv", "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster",
    "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)


@dataclasses.dataclass
class Detection:
    """One detected object. ``box`` = [x1, y1, x2, y2] in pixels; ``mask`` = [H, W] bool or None (a box-only
    detector; the colour crop then uses the whole box); a preset ``color`` skips the colour classifier."""

    box: Sequence[float]
    score: float
    mask: np.ndarray | None = None
    color: str | None = None


@dataclasses.dataclass
class GenEvalResult:
    correct: bool  # the official evaluator's verdict
    score: float  # the reference's RL partial credit (not clamped; can be negative)
    reason: str  # the official failure texts, newline-joined ("" when correct)
    strict_correct: bool  # the RL rule's exact-count verdict
    strict_reason: str
    details: dict[str, list[list[float]]]  # class -> kept boxes [x1, y1, x2, y2, score]


ColorFn = Callable[[str, Sequence[Detection]], Sequence[str]]


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Relations of A relative to B: subset of {left of, right of, above, below} (image y grows downward).

    Centre offset shrunk per axis by 0.1 x (size A + size B), then divided by the norm of the *original* offset."""
    boxes = np.array([box_a[:4], box_b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    dim_a, dim_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (dim_a + dim_b), 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def filter_detections(raw: Iterable[tuple[str, Sequence[float], float, np.ndarray | None]],
                      tag: str) -> dict[str, list[Detection]]:
    """The official per-class filter: score strictly above 0.3 (0.9 for counting), highest first, at most 16 per
    class, no overlap suppression; classes with nothing kept are absent. ``raw`` = (class, box, score, mask)."""
    threshold = COUNTING_THRESHOLD if tag == "counting" else THRESHOLD
    by_class: dict[str, list[Detection]] = defaultdict(list)
    for name, box, score, mask in raw:
        if float(score) > threshold:
            by_class[name].append(Detection([float(v) for v in box[:4]], float(score), mask))
    out = {}
    for name, dets in by_class.items():
        dets.sort(key=lambda d: -d.score)  # stable: ties keep detector order
        out[name] = dets[:MAX_OBJECTS]
    return out


class _Colors:
    """Colour of each detection, classified at most once (the reference classifies the same objects twice)."""

    def __init__(self, classify: ColorFn | None):
        self.classify = classify
        self.cache: dict[int, str] = {}

    def __call__(self, classname: str, dets: Sequence[Detection]) -> list[str]:
        todo = [d for d in dets if d.color is None and id(d) not in self.cache]
        if todo:
            if self.classify is None:
                raise ValueError(f"colour needed for {classname!r} but no classifier and no preset colour")
            colors = list(self.classify(classname, todo))
            if len(colors) != len(todo):
                raise ValueError(f"colour classifier returned {len(colors)} colours for {len(todo)} objects")
            for d, c in zip(todo, colors):
                self.cache[id(d)] = c
        return [d.color if d.color is not None else self.cache[id(d)] for d in dets]


def _color_reason(req: Mapping[str, Any], classname: str, colors: list[str]) -> str:
    want = req["color"]
    return (f"expected {want} {classname}>={req['count']}, found {colors.count(want)} {want}; and "
            + ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors))


def _position_fails(req, found, matched_groups, classname) -> str | None:
    """None when every object has the relation to every target object; else the official failure text."""
    expected_rel, target_group = req["position"]
    for obj in found:
        for target in matched_groups[target_group]:
            rels = relative_position(obj.box, target.box)
            if expected_rel not in rels:
                return f"expected {classname} {expected_rel} target, found {' and '.join(rels)} target"
    return None


def _official(metadata: Mapping[str, Any], objects: Mapping[str, list[Detection]], colors: _Colors
              ) -> tuple[bool, list[str]]:
    correct, reason, matched_groups = True, [], []
    for req in metadata.get("include", []):
        classname, matched = req["class"], True
        found = objects.get(classname, [])[:req["count"]]
        if len(found) < req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}>={req['count']}, found {len(found)}")
        else:
            if "color" in req:
                got = colors(classname, found)
                if got.count(req["color"]) < req["count"]:
                    correct = matched = False
                    reason.append(_color_reason(req, classname, got))
            if "position" in req and matched:
                if matched_groups[req["position"][1]] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {req['position'][0]}")
                else:
                    fail = _position_fails(req, found, matched_groups, classname)
                    if fail:
                        correct = matched = False
                        reason.append(fail)
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []):
        classname = req["class"]
        if len(objects.get(classname, [])) >= req["count"]:
            correct = False
            reason.append(f"expected {classname}<{req['count']}, found {len(objects[classname])}")
    return correct, reason


def _partial_credit(metadata: Mapping[str, Any], objects: Mapping[str, list[Detection]], colors: _Colors
                    ) -> tuple[bool, float, list[str]]:
    """The reference server's ``evaluate_reward``: exact counts over all kept detections, one component per check.

    Kept quirks (spec §7.4): the count component is not clamped (3 found for 1 asked gives -1); a failed position
    appends 0 *and then* 1; ``exclude`` is ignored (exact counts already enforce it)."""
    correct, reason, parts, matched_groups = True, [], [], []
    for req in metadata.get("include", []):
        classname, matched = req["class"], True
        found = objects.get(classname, [])
        parts.append(1 - abs(req["count"] - len(found)) / req["count"])
        if len(found) != req["count"]:
            correct = matched = False
            reason.append(f"expected {classname}=={req['count']}, found {len(found)}")
            if "color" in req or "position" in req:
                parts.append(0.0)
        else:
            if "color" in req:
                got = colors(classname, found)
                k = got.count(req["color"])
                parts.append(1 - abs(req["count"] - k) / req["count"])
                if k != req["count"]:
                    correct = matched = False
                    reason.append(_color_reason(req, classname, got))
            if "position" in req and matched:
                if matched_groups[req["position"][1]] is None:
                    correct = matched = False
                    reason.append(f"no target for {classname} to be {req['position'][0]}")
                    parts.append(0.0)
                else:
                    fail = _position_fails(req, found, matched_groups, classname)
                    if fail:
                        correct = matched = False
                        reason.append(fail)
                        parts.append(0.0)
                    parts.append(1.0)  # [quirk] also after a failure
        matched_groups.append(found if matched else None)
    return correct, (sum(parts) / len(parts) if parts else 0.0), reason


def evaluate(metadata: Mapping[str, Any], detections: Mapping[str, list[Detection]],
             classify_color: ColorFn | None = None) -> GenEvalResult:
    """Judge one image. ``detections``: class -> kept detections, highest confidence first (``filter_detections``
    output, or a fixture). ``classify_color(class, detections) -> colours`` is called only for objects without a
    preset colour, and at most once per object."""
    if not isinstance(metadata, Mapping) or not isinstance(metadata.get("include"), list):
        raise ValueError("GenEval metadata needs an 'include' list of {class, count, [color], [position]}")
    for req in metadata["include"]:
        if not isinstance(req, Mapping) or "class" not in req or int(req.get("count", 0)) < 1:
            raise ValueError(f"GenEval include entry {req!r}: needs 'class' and a positive 'count'")
    colors = _Colors(classify_color)
    correct, reason = _official(metadata, detections, colors)
    strict, score, strict_reason = _partial_credit(metadata, detections, colors)
    details = {k: [[*map(float, d.box[:4]), float(d.score)] for d in v] for k, v in detections.items()}
    return GenEvalResult(correct, float(score), "\n".join(reason), strict, "\n".join(strict_reason), details)


def summarize(results: Iterable[Any]) -> dict[str, Any]:
    """The official ``summary_scores.py`` over per-image rows (objects or dicts with ``tag``, ``correct`` and
    ``prompt``; a ``metadata`` string, as in the official result file, identifies the prompt when present).

    overall = unweighted mean of the per-tag means (tags in order of first appearance), not the mean over images."""
    rows = [r if isinstance(r, Mapping) else vars(r) for r in results]
    if not rows:
        raise ValueError("summarize: no results")
    by_tag: dict[str, list[bool]] = {}
    by_prompt: dict[str, list[bool]] = {}
    for r in rows:
        ok = bool(r["correct"])
        by_tag.setdefault(r["tag"], []).append(ok)
        key = r.get("metadata") or r["prompt"]
        by_prompt.setdefault(key if isinstance(key, str) else json.dumps(key), []).append(ok)
    tags = {tag: float(np.mean(v)) for tag, v in by_tag.items()}
    return {
        "images": len(rows),
        "prompts": len(by_prompt),
        "correct_images": float(np.mean([bool(r["correct"]) for r in rows])),
        "correct_prompts": float(np.mean([any(v) for v in by_prompt.values()])),
        "tags": tags,
        "tag_counts": {tag: (int(sum(v)), len(v)) for tag, v in by_tag.items()},
        "overall": float(np.mean(list(tags.values()))),
    }


class GenEvalReward:
    """Detector + colour classifier + the rules; the reward is the partial-credit ``score`` (the reference's
    ``scores``); ``correct`` and ``strict_correct`` come back as extras for logging. Routed to ``geneval`` rows."""

    name = "geneval"
    tasks = frozenset({"geneval"})

    def __init__(self, detector, color_classifier=None):
        self.detector = detector  # .detect(list of [H, W, 3] uint8) -> list of list of (class, box, score, mask)
        self.color_classifier = color_classifier  # .classify(image, class, detections) -> colours

    @classmethod
    def from_paths(cls, detector_path: str, clip_path: str, device: str = "cpu", batch_size: int = 8):
        return cls(TransformersDetector(detector_path, device=device, batch_size=batch_size),
                   ClipColorClassifier(clip_path, device=device, batch_size=batch_size))

    def evaluate_images(self, images: Sequence[np.ndarray], metadata: Sequence[Mapping[str, Any]]
                        ) -> list[GenEvalResult | Exception]:
        raw = self.detector.detect(list(images))
        out: list[GenEvalResult | Exception] = []
        for image, meta, dets in zip(images, metadata, raw):
            try:
                objects = filter_detections(dets, meta.get("tag", "") if isinstance(meta, Mapping) else "")
                clf = None
                if self.color_classifier is not None:
                    clf = (lambda img: lambda name, ds: self.color_classifier.classify(img, name, ds))(image)
                out.append(evaluate(meta, objects, clf))
            except Exception as e:  # noqa: BLE001 - one bad row (e.g. malformed metadata) fails only itself
                out.append(e)
        return out

    def score(self, batch: RewardBatch) -> RewardScores:
        n = len(batch)
        scores, errors = np.full(n, math.nan), [None] * n
        correct, strict = np.full(n, math.nan), np.full(n, math.nan)
        for i, res in enumerate(self.evaluate_images(batch.images, batch.metadata)):
            if isinstance(res, Exception):
                errors[i] = f"{type(res).__name__}: {res}"
            else:
                scores[i], correct[i], strict[i] = res.score, float(res.correct), float(res.strict_correct)
        return RewardScores(scores, errors, {"correct": correct, "strict_correct": strict})


# ----------------------------------------------------------------------------------------------------------------
# Models: a transformers detector and the CLIP colour classifier.
# ----------------------------------------------------------------------------------------------------------------

_OBJECTS = set(OBJECT_NAMES)
# Other spellings of the COCO classes in detector configs (COCO's own short names, VOC names).
_ALIASES = {"mouse": "computer mouse", "remote": "tv remote", "keyboard": "computer keyboard", "tvmonitor": "tv",
            "tv monitor": "tv", "hair dryer": "hair drier", "motorbike": "motorcycle", "aeroplane": "airplane",
            "sofa": "couch", "pottedplant": "potted plant", "diningtable": "dining table", "doughnut": "donut",
            "cellphone": "cell phone"}


def geneval_class(label: str) -> str | None:
    """A detector label -> GenEval class name, or None for labels GenEval does not know (stuff, "N/A")."""
    name = " ".join(label.strip().lower().replace("_", " ").replace("-", " ").split())
    name = _ALIASES.get(name, name)
    return name if name in _OBJECTS else None


def _mask_to_box(masks):
    """[K, H, W] bool -> [K, 4] (x1, y1, x2 + 1, y2 + 1) of the set pixels, zeros for an empty mask (mmdet)."""
    import torch

    boxes = torch.zeros(masks.shape[0], 4)
    x_any, y_any = masks.any(dim=1), masks.any(dim=2)
    for k in range(masks.shape[0]):
        xs, ys = torch.where(x_any[k])[0], torch.where(y_any[k])[0]
        if len(xs) and len(ys):
            boxes[k] = torch.tensor([xs[0], ys[0], xs[-1] + 1, ys[-1] + 1], dtype=torch.float32)
    return boxes


def mask2former_instances(class_logits, mask_logits, input_hw, valid_hw, image_hw, max_per_image: int = 100,
                          min_score: float = -1.0):
    """mmdet's Mask2Former instance post-processing for one image (what GenEval's detector outputs).

    class_logits [Q, C+1] (last = no object), mask_logits [Q, h, w] at 1/4 of the padded input ``input_hw``;
    the first ``valid_hw`` input pixels are the resized image, ``image_hw`` the original size. Top ``max_per_image``
    (query, class) pairs by class probability; mask = logit > 0 at the original size; score = class probability x
    mean mask probability inside the mask; box = the mask's extent. Returns (labels [K], boxes [K, 4],
    masks [K, H, W] bool, scores [K]). Pairs whose class probability is at most ``min_score`` are dropped before
    the masks are upsampled: their final score (class probability x a mask probability <= 1) cannot exceed it."""
    import torch
    import torch.nn.functional as F

    num_classes = class_logits.shape[-1] - 1
    probs = class_logits.float().softmax(-1)[:, :-1]
    k = min(max_per_image, probs.numel())
    top_scores, top_idx = probs.flatten().topk(k, sorted=False)
    keep = top_scores > min_score
    top_scores, top_idx = top_scores[keep], top_idx[keep]
    labels, queries = top_idx % num_classes, top_idx // num_classes
    if not len(queries):
        return labels, torch.zeros(0, 4), torch.zeros(0, *image_hw, dtype=torch.bool), top_scores
    masks = mask_logits[queries].float()[None]
    masks = F.interpolate(masks, size=tuple(input_hw), mode="bilinear", align_corners=False)
    masks = masks[:, :, :valid_hw[0], :valid_hw[1]]
    masks = F.interpolate(masks, size=tuple(image_hw), mode="bilinear", align_corners=False)[0]
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    return labels, _mask_to_box(binary), binary, top_scores * mask_scores


class TransformersDetector:
    """COCO instance detector from a local transformers folder: Mask2Former (instance masks, as GenEval's mmdet
    Mask2Former; e.g. a ``mask2former-swin-small-coco-instance`` conversion) or any ``AutoModelForObjectDetection``
    (DETR family; boxes only, so colour crops use the whole box). Images go in as RGB, as transformers expects
    (the reference server hands RGB arrays to an mmdet model trained on BGR, spec §7.4)."""

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 8, max_per_image: int = 100):
        import torch
        from transformers import AutoConfig

        from rewards.clip import load_image_processor

        config = AutoConfig.from_pretrained(path)
        self.is_mask2former = config.model_type == "mask2former"
        self.processor = load_image_processor(path)
        self.model = (_load_mask2former(path) if self.is_mask2former else _load_detection_model(path))
        self.model = self.model.to(device).eval().requires_grad_(False)
        self.labels = {int(i): geneval_class(str(n)) for i, n in config.id2label.items()}
        if not any(self.labels.values()):
            raise ValueError(f"{path}: no COCO class names in id2label; not a COCO detector")
        self.device, self.batch_size, self.max_per_image = torch.device(device), batch_size, max_per_image

    def detect(self, images: Sequence[np.ndarray]) -> list[list[tuple[str, list[float], float, np.ndarray | None]]]:
        """Per image: (GenEval class, [x1, y1, x2, y2], score, mask [H, W] bool or None); not yet filtered by
        ``filter_detections`` (Mask2Former leaves out only what no threshold could keep)."""
        import torch

        out = []
        with torch.no_grad():
            for i in range(0, len(images), self.batch_size):
                out.extend(self._detect(list(images[i:i + self.batch_size])))
        return out

    def _detect(self, images):
        from PIL import Image

        inputs = self.processor(images=[Image.fromarray(im) for im in images], return_tensors="pt")
        kwargs = {"pixel_values": inputs["pixel_values"].to(self.device)}
        if "pixel_mask" in inputs:
            kwargs["pixel_mask"] = inputs["pixel_mask"].to(self.device)
        outputs = self.model(**kwargs)
        sizes = [im.shape[:2] for im in images]
        if not self.is_mask2former:
            results = self.processor.post_process_object_detection(outputs, threshold=0.0, target_sizes=sizes)
            return [[(self.labels.get(int(lab)), _clip_box(box.tolist(), hw), float(s), None)
                     for s, lab, box in zip(r["scores"], r["labels"], r["boxes"]) if self.labels.get(int(lab))]
                    for r, hw in zip(results, sizes)]
        input_hw = kwargs["pixel_values"].shape[-2:]
        batch = []
        for b, hw in enumerate(sizes):
            valid = input_hw
            if "pixel_mask" in kwargs:
                pm = kwargs["pixel_mask"][b].bool()
                valid = (int(pm.any(1).sum()), int(pm.any(0).sum()))
            # No detection at or under the lowest GenEval threshold can be kept: skip their full-size masks.
            labels, boxes, masks, scores = mask2former_instances(
                outputs.class_queries_logits[b], outputs.masks_queries_logits[b], input_hw, valid, hw,
                self.max_per_image, min_score=min(THRESHOLD, COUNTING_THRESHOLD))
            batch.append([(self.labels.get(int(lab)), box.tolist(), float(s), m.cpu().numpy())
                          for lab, box, m, s in zip(labels, boxes, masks, scores) if self.labels.get(int(lab))])
        return batch


def _clip_box(box: list[float], hw) -> list[float]:
    """Boxes from centre/size predictions can leave the image; clip them to it (as mmdet does)."""
    h, w = hw
    return [min(max(box[0], 0.0), w), min(max(box[1], 0.0), h), min(max(box[2], 0.0), w), min(max(box[3], 0.0), h)]


def _load_detection_model(path: str):
    from transformers import AutoModelForObjectDetection

    return AutoModelForObjectDetection.from_pretrained(path)


def _load_mask2former(path: str):
    """transformers builds Mask2Former's training loss at construction, and that needs scipy (Hungarian matching).
    Inference never uses it; without scipy the check is skipped while the model is built."""
    import importlib.util
    from unittest import mock

    from transformers import Mask2FormerForUniversalSegmentation
    from transformers.models.mask2former import modeling_mask2former

    if importlib.util.find_spec("scipy") is not None:
        return Mask2FormerForUniversalSegmentation.from_pretrained(path)
    with mock.patch.object(modeling_mask2former, "requires_backends", lambda *a, **k: None):
        return Mask2FormerForUniversalSegmentation.from_pretrained(path)


class ClipColorClassifier:
    """GenEval's colour classifier with transformers CLIP: each object's mask pasted over flat #999999 grey, cropped
    to its box, CLIP-encoded and compared with one text embedding per colour (normalised mean of three templates'
    normalised embeddings); argmax over the 10 colours. GenEval uses OpenAI CLIP ViT-L/14."""

    TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 16, clip=None):
        from rewards.clip import load_clip

        self.clip = clip if clip is not None else load_clip(path, device)
        self.batch_size = batch_size
        self._text: dict[str, Any] = {}

    def text_classifier(self, classname: str):
        """[D, 10] normalised colour embeddings for ``classname``, cached per class."""
        import torch

        from rewards.clip import encode_texts, normalize

        if classname not in self._text:
            cols = []
            for c in COLORS:
                emb = normalize(encode_texts(self.clip, [t.format(c=c, cls=classname) for t in self.TEMPLATES]))
                cols.append(normalize(emb.mean(0)))
            self._text[classname] = torch.stack(cols, dim=1)
        return self._text[classname]

    @staticmethod
    def crops(image: np.ndarray, detections: Sequence[Detection]):
        from PIL import Image

        pil = Image.fromarray(image)
        blank = Image.new("RGB", pil.size, color="#999")
        out = []
        for d in detections:
            if d.mask is not None:
                if tuple(d.mask.shape) != image.shape[:2]:
                    raise ValueError(f"mask {d.mask.shape} does not match image {image.shape[:2]}")
                src = Image.composite(pil, blank, Image.fromarray(np.asarray(d.mask, dtype=bool)))
            else:
                src = pil
            x1, y1, x2, y2 = (float(v) for v in d.box[:4])
            # PIL rounds the box like the reference; a box under one pixel is widened so CLIP has something to see.
            x2, y2 = max(x2, x1 + 1), max(y2, y1 + 1)
            out.append(src.crop((x1, y1, x2, y2)))
        return out

    def classify(self, image: np.ndarray, classname: str, detections: Sequence[Detection]) -> list[str]:
        from rewards.clip import encode_images, normalize

        if not detections:
            return []
        feats = normalize(encode_images(self.clip, self.crops(image, detections), self.batch_size))
        return [COLORS[int(i)] for i in (feats @ self.text_classifier(classname)).argmax(1)]
