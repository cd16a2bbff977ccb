"""The Ray decoder pool on a local Ray: results in order, bad input per sample, backpressure, an actor killed in the
middle of a batch, timeouts."""
from __future__ import annotations

import numpy as np
import pytest
import ray

from actors.decoder_pool import DecoderPool
from uniar_ray.config import DecoderConfig
from uniar_ray.decoder import DecodeRequest
from uniar_ray.decoder.tiny import random_bits

STEPS = 6


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def pool(local_ray):
    cfg = DecoderConfig(path="tiny", num_actors=2, num_cpus=0.5, num_threads=1, max_batch=1, max_inflight_per_actor=2,
                        num_inference_steps=STEPS, guidance_scale=1.5, upsampling_ratio=1.0, max_retries=2)
    p = DecoderPool(cfg)
    p.wait_ready(timeout_s=300)
    yield p
    p.shutdown()


def _requests(n: int, seed: int = 0) -> list[DecodeRequest]:
    bits = random_bits(n, 64, 64, seed=seed)
    return [DecodeRequest.from_bits(bits[i], 64, 64, seed=100 + i, request_id=f"r{i}") for i in range(n)]


def test_results_in_order_and_equal_to_a_local_decode(pool, tiny_decoder):
    reqs = _requests(3)
    res = pool.decode_requests(reqs)
    assert [r.request_id for r in res] == ["r0", "r1", "r2"] and all(r.ok for r in res)
    local = tiny_decoder.decode_requests(reqs, 1.0, STEPS, 1.5)  # same tiny seed, same checkpoint
    for a, b in zip(res, local):
        assert a.image.shape == (64, 64, 3) and np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
    big = pool.decode_requests(reqs[:1], upsampling_ratio=2.0)
    assert big[0].image.shape == (128, 128, 3)


def test_bad_request_fails_alone(pool):
    reqs = _requests(3, seed=1)
    reqs[1] = DecodeRequest(reqs[1].bits_packed[:10], reqs[1].bits_shape, 64, 64, request_id="short")
    reqs.append(DecodeRequest.from_bits(random_bits(1, 64, 64)[0], 64, 64, upsampling_ratio=3.0, request_id="ratio"))
    res = pool.decode_requests(reqs)
    assert [r.ok for r in res] == [True, False, True, False]
    assert "bad bits" in res[1].error and "between 1.0 and 2.0" in res[3].error
    assert res[1].image is None and res[3].image is None  # never a blank image in place of a failure


def test_backpressure_bounds_calls_in_flight(pool):
    pool.peak_inflight = 0
    res = pool.decode_requests(_requests(7, seed=2))
    assert all(r.ok for r in res)
    assert pool.peak_inflight <= pool.capacity == 4
    assert pool.queue_depth == 0


def test_an_actor_killed_mid_batch_loses_no_image(pool):
    reqs = _requests(8, seed=3)
    want = [r.image for r in pool.decode_requests(reqs)]
    retries = pool.stats["retries"]
    ticket = pool.submit(reqs)  # returns once 4 of 8 calls are out and the rest queued behind them
    load = pool.inflight_per_actor
    busy = load.index(max(load))
    assert load[busy] > 0  # that actor is in the middle of this batch
    ray.kill(pool.actors[busy], no_restart=False)  # Ray restarts it (max_restarts)
    res = pool.collect(ticket, timeout_s=300)
    assert all(r.ok for r in res), [r.error for r in res]
    assert pool.stats["retries"] > retries and max(r.attempts for r in res) >= 2
    for r, w in zip(res, want):  # seeds travel with the requests: the retried samples are the same images
        assert np.abs(r.image.astype(int) - w.astype(int)).max() <= 1


def test_timeout_fails_with_the_reason(local_ray):
    cfg = DecoderConfig(path="tiny", num_actors=1, num_cpus=0.5, num_threads=1, num_inference_steps=400,
                        upsampling_ratio=1.0, timeout_s=0.5, max_retries=0, max_batch=4)
    p = DecoderPool(cfg)
    try:
        p.wait_ready(timeout_s=300)
        res = p.decode_requests(_requests(2, seed=4))
        assert [r.ok for r in res] == [False, False]
        assert all("timed out after" in r.error and "after 1 attempts" in r.error for r in res)
    finally:
        p.shutdown()
