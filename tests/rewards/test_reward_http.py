"""The HTTP reward against a server the test starts on 127.0.0.1: the JSON protocol (images as PIL's PNG/JPEG, in
order, null = not applicable, details), chunks and the concurrency limit, the bearer token, and every failure (down,
slow, HTTP 500, wrong number of scores, not JSON) as NaN + one reason naming the URL, retried with backoff where a
retry can help; nothing hangs (the client's own timeout ends a silent server)."""
from __future__ import annotations

import base64
import io
import logging
import math
import threading

import numpy as np
import pytest
from PIL import Image

from rewards.base import RewardBatch
from rewards.http import HttpReward, parse_answer, ProtocolError


def _batch(n=5, tasks=None):
    images = [np.full((16, 24, 3), 40 * i + 10, np.uint8) for i in range(n)]
    return RewardBatch(images, [f"prompt {i}" for i in range(n)], tasks or ["general"] * n,
                       [{"i": i} for i in range(n)])


def _reward(url, sleeps=None, **kw):
    kw.setdefault("request_timeout_s", 10.0)
    if sleeps is not None:
        kw["sleep"] = sleeps.append  # the backoff waits are recorded, not slept
    return HttpReward("srv", url, **kw)


def test_scores_arrive_in_order_with_details_and_null(reward_server):
    batch = _batch(5, tasks=["general", "skip", None, "ocr", "general"])
    out = _reward(reward_server.url, batch_size=2).score(batch)
    assert len(reward_server.requests) == 3  # 2 + 2 + 1 samples per POST
    want = [im.mean() / 255 for im in batch.images]
    np.testing.assert_allclose(out.scores[[0, 2, 3, 4]], np.array(want)[[0, 2, 3, 4]])
    assert math.isnan(out.scores[1]) and out.errors == [None] * 5  # null: not applicable, not a failure
    assert [d["prompt"] for d in out.details] == batch.prompts and out.details[2]["task"] == ""
    body = next(r["body"] for r in reward_server.requests if r["body"]["metadata"][0] == {"i": 0})  # (concurrent)
    assert set(body) == {"prompts", "images", "tasks", "metadata"} and body["metadata"] == [{"i": 0}, {"i": 1}]
    png = base64.b64decode(body["images"][0])
    assert png[:4] == b"\x89PNG" and (np.asarray(Image.open(io.BytesIO(png))) == batch.images[0]).all()


def test_jpeg_bytes_are_pils_at_that_quality(reward_server):
    batch = _batch(2)
    _reward(reward_server.url, image_format="jpeg", jpeg_quality=75).score(batch)
    assert len(reward_server.requests) == 1
    for im, sent in zip(batch.images, reward_server.requests[0]["body"]["images"]):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG")  # the reference's call: PIL's default quality
        assert base64.b64decode(sent) == buf.getvalue()


def test_concurrency_limit_and_bearer_token(reward_server, monkeypatch):
    monkeypatch.setenv("MY_REWARD_TOKEN", "s3cret")
    reward_server.barrier = threading.Barrier(2)  # each request waits for a second one in flight
    out = _reward(reward_server.url, batch_size=1, concurrency=2, token_env="MY_REWARD_TOKEN").score(_batch(6))
    assert out.errors == [None] * 6 and reward_server.max_in_flight == 2
    assert {r["auth"] for r in reward_server.requests} == {"Bearer s3cret"}
    monkeypatch.delenv("MY_REWARD_TOKEN")
    with pytest.raises(RuntimeError, match="MY_REWARD_TOKEN is not set"):
        _reward(reward_server.url, token_env="MY_REWARD_TOKEN")


@pytest.mark.parametrize("mode, reason, tries", [
    ("http500", " failed after 3 tries: HTTP 500 (Traceback: boom line 2)", 3),
    ("hang", " failed after 3 tries: no answer within request_timeout_s=0.3", 3),
    ("wrong_count", ": bad answer: 2 scores for 3 images", 1),
    ("not_json", ": bad answer: not JSON: b'<html>oops</html>'", 1),
])
def test_failures_are_nan_with_one_reason_naming_the_url(reward_server, mode, reason, tries, caplog):
    reward_server.mode = mode
    sleeps = []
    with caplog.at_level(logging.WARNING, logger="rewards.http"):
        out = _reward(reward_server.url, sleeps, request_timeout_s=0.3).score(_batch(3))
    assert np.isnan(out.scores).all()
    assert out.errors == [f"POST {reward_server.url}{reason}"] * 3
    assert len(reward_server.requests) == tries and sleeps == [5.0, 10.0][:tries - 1]  # the reference's 5 s, 10 s
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"reward srv: {out.errors[0]}"]  # one line, naming the reward and the URL


def test_server_down_and_recovering(dead_url, reward_server):
    sleeps = []
    out = _reward(dead_url, sleeps, retries=1, retry_backoff_s=2.0).score(_batch(2))
    assert out.errors[0].startswith(f"POST {dead_url} failed after 2 tries: cannot connect (")
    assert sleeps == [2.0] and np.isnan(out.scores).all()
    reward_server.mode, reward_server.fail_first = "fail_first", 1  # 503 once, then the answer
    out = _reward(reward_server.url, sleeps).score(_batch(2))
    assert out.errors == [None, None] and len(reward_server.requests) == 2


def test_answer_parsing_rules():
    ok = parse_answer(b'{"scores": [1, null, 0.5, Infinity], "details": [null, {}, {"error": "no face"}, null]}', 4)
    assert ok.scores[0] == 1.0 and math.isnan(ok.scores[1]) and ok.errors[1] is None
    assert ok.errors[2] == "server: no face" and ok.errors[3] == "non-finite score inf"
    for raw, match in [(b'{"score": []}', '"scores" list'), (b'{"scores": [true]}', "score 0 is True"),
                       (b'{"scores": ["1"]}', "score 0 is '1'"), (b'{"scores": [1], "details": [1]}', '"details"'),
                       (b'[1]', '"scores" list')]:
        with pytest.raises(ProtocolError, match=match):
            parse_answer(raw, 1)
