"""Reward inputs as the reference sent them: each kind's image format and quality, the JPEG round trip a reward
scores (bytes equal to PIL's encoding), bits for the rewards that read bits, and the config rules of the new keys
(the YAML key ``class``, fields only some rewards read, runtime_env keys, kinds inferred)."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rewards.base import (ImageCodec, PackedBits, RewardBatch, RewardScores, as_sent, encode_image, plain_details,
                          score_checked)
from uniar_ray.config import ConfigError, GRPORunConfig, RewardConfig, from_dict, load_config


class Recorder:
    """Scores the mean pixel and keeps what it was given."""

    name, tasks = "recorder", None

    def __init__(self, inputs="pixels"):
        self.inputs, self.seen = inputs, []

    def score(self, batch: RewardBatch) -> RewardScores:
        self.seen.append(batch)
        if self.inputs == "bits":
            return RewardScores([float(b.unpack().float().mean()) for b in batch.bits], [None] * len(batch))
        return RewardScores([im.mean() / 255 for im in batch.images], [None] * len(batch),
                            details=[{"shape": im.shape, "mean": np.float32(im.mean())} for im in batch.images])


def _photo(seed=0, h=48, w=64):
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _pil_jpeg(image: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).convert("RGB").save(buf, format="JPEG", **kw)
    return buf.getvalue()


def test_reference_image_defaults_per_kind():
    cfg = from_dict(RewardConfig, {"models": {
        "hps": {"model_path": "tiny"}, "geneval": {"model_path": "tiny", "clip_path": "tiny"}, "ocr": {},
        "judge": {"model_path": "tiny"}, "pickscore": {"model_path": "tiny"}, "brightness": {},
        "sharp": {"kind": "hps", "model_path": "tiny", "image_format": "png"},
        "q90": {"kind": "ocr", "jpeg_quality": 90}}})
    got = {n: (s.image_format, s.jpeg_quality) for n, s in cfg.models.items()}
    assert got == {"hps": ("jpeg", 75), "geneval": ("jpeg", 75), "ocr": ("jpeg", 75), "judge": ("jpeg", 95),
                   "pickscore": ("png", 0), "brightness": ("png", 0), "sharp": ("png", 0), "q90": ("jpeg", 90)}
    judge = cfg.models["judge"]
    assert (judge.max_new_tokens, judge.missing_score, judge.trust_remote_code) == (4096, "zero", False)
    from uniar_ray.config import GRPOConfig

    assert GRPOConfig().all_nan_rewards == "zero"


def test_reward_scores_the_jpeg_round_trip_the_reference_sent():
    image = _photo()
    # The reference: image.save(buf, format="JPEG") for hps/geneval/ocr (PIL's default quality, 75) and
    # quality=95 for the judge. Our encoder writes those exact bytes.
    assert encode_image(image, "jpeg", 75) == _pil_jpeg(image)
    assert encode_image(image, "jpeg", 95) == _pil_jpeg(image, quality=95)
    for quality in (75, 95):
        served = np.asarray(Image.open(io.BytesIO(_pil_jpeg(image, quality=quality))).convert("RGB"))
        rec = Recorder()
        out = score_checked(rec, [image], ["p"], [None], [{}], codec=ImageCodec("jpeg", quality))
        np.testing.assert_array_equal(rec.seen[0].images[0], served)  # what the server decoded, pixel for pixel
        assert not np.array_equal(served, image)  # lossy: a reward on lossless pixels would see other values
        assert out.scores[0] == pytest.approx(served.mean() / 255)
        np.testing.assert_array_equal(as_sent(image, "jpeg", quality), served)
    rec = Recorder()
    score_checked(rec, [image], ["p"], [None], [{}], codec=ImageCodec("png"))
    np.testing.assert_array_equal(rec.seen[0].images[0], image)  # png: the pixels unchanged


def test_bits_readers_get_bits_and_no_images():
    from uniar_ray.bits import pack_bits

    bits = (np.random.default_rng(0).random((4, 2, 4, 8)) < 0.25).astype(np.uint8)
    good = PackedBits(pack_bits(bits), bits.shape, 64, 64)
    short = PackedBits(good.packed[:-1], bits.shape, 64, 64)
    rec = Recorder(inputs="bits")
    out = score_checked(rec, [None, None, None], ["a", "b", "c"], [None] * 3, [{}] * 3, bits=[good, short, None])
    assert out.scores[0] == pytest.approx(bits.mean()) and rec.seen[0].images == [None]
    assert out.errors[1] == "bits rejected: 31 packed bytes (uint8) for shape (4, 2, 4, 8), expected 32 uint8"
    assert out.errors[2] == "bits rejected: no bits for this sample"
    pixels = score_checked(Recorder(), [None, _photo()], ["a", "b"], [None] * 2, [{}] * 2)
    assert pixels.errors[0] == "no image: this sample was not decoded" and pixels.errors[1] is None
    assert pixels.details[1] == {"shape": [48, 64, 3], "mean": pytest.approx(float(_photo().mean()), rel=1e-6)}


def test_details_are_plain_json():
    assert plain_details({"a": np.float64("nan"), "b": np.arange(2), "c": (1, "x"), "d": object}) == {
        "a": None, "b": [0, 1], "c": [1, "x"], "d": str(object)}
    assert plain_details([1]) == {"details_dropped": "expected a JSON object, got list"}
    assert "details_dropped" in plain_details({"big": "x" * 70_000})


def test_config_class_key_runtime_env_and_fields_only_some_rewards_read(tmp_path):
    cfg = load_config(GRPORunConfig, "configs/grpo_demo.yaml", [
        "rewards.models.mine.class=my_pkg.rewards:Aesthetic", "rewards.models.mine.options={scale: 2}",
        "rewards.models.mine.runtime_env={pip: [numpy], env_vars: {A: '1'}}",
        "rewards.models.srv.backend=http", "rewards.models.srv.url=http://127.0.0.1:9/score",
        "rewards.models.hps.backend=http", "rewards.models.hps.url=http://127.0.0.1:9/hps",
        "rewards.models.me.kind=self_judge", "rewards.models.me.questions={ocr: 'Is {prompt} written here?'}"])
    m = cfg.rewards.models
    assert (m["mine"].kind, m["mine"].class_path, m["mine"].options) == ("custom", "my_pkg.rewards:Aesthetic",
                                                                         {"scale": 2})
    assert m["mine"].runtime_env == {"pip": ["numpy"], "env_vars": {"A": "1"}}
    assert (m["srv"].kind, m["srv"].image_format) == ("http", "png")
    assert (m["hps"].kind, m["hps"].image_format, m["hps"].jpeg_quality) == ("hps", "jpeg", 75)  # served, as the ref
    assert (m["me"].inputs, m["me"].model_path) == ("bits", "tiny")  # self_judge: the policy's own path
    assert sorted(cfg.rewards.pixel_rewards) == ["hps", "mine", "srv", "target_color"]
    bad = {"url": "http://x", "question": "hi?", "max_new_tokens": 8, "trust_remote_code": True, "options": {"a": 1}}
    for key, value in bad.items():
        with pytest.raises(ConfigError, match=rf"rewards.models.ocr.{key}: only read by"):
            from_dict(RewardConfig, {"models": {"ocr": {key: value}}})
    for models, match in [
        ({"x": {"class": "no_colon"}}, r"expected package.module:ClassName"),
        ({"x": {"class": "a:B", "runtime_env": {"pipp": []}}}, r"unknown key\(s\) \['pipp'\]"),
        ({"x": {"backend": "http"}}, r"needs url: http://"),
        ({"x": {"backend": "http", "url": "http://h/", "request_timeout_s": 300}}, r"3 tries of request_timeout_s=300 "
         r"and their backoff take up to 915 s, over the call's timeout_s=600"),
        ({"x": {"kind": "http"}}, r"kind http needs backend: http"),
        ({"ocr": {"image_format": "gif"}}, r"image_format='gif'"),
        ({"ocr": {"image_format": "png", "jpeg_quality": 80}}, r"only read with image_format: jpeg"),
        ({"self_judge": {"image_format": "jpeg"}}, r"do not apply to a reward that reads bits"),
        ({"hps": {"model_path": "tiny", "inputs": "bits"}}, r"kind hps reads pixels"),
        ({"x": {}}, r"set kind"),
    ]:
        with pytest.raises(ConfigError, match=match):
            from_dict(RewardConfig, {"models": models})
