"""Decoder pool: N Ray actors running ``UniARDecoder`` on bit-packed requests, with backpressure, per-call timeouts
and retries, and a per-sample result that is an image or the reason there is none.

    pool = DecoderPool(cfg.decoder)                # cfg.num_actors actors, each with num_cpus / num_gpus
    ticket = pool.submit(requests)                  # DecodeRequest list; blocks only while the pool is full
    results = pool.collect(ticket)                  # one DecodeResult per request, in order
    results = pool.decode_requests(requests, num_inference_steps=14, guidance_scale=1.0)   # both at once
    pool.shutdown()

Requests are cut into calls of at most ``max_batch`` and sent to the least-loaded actor; at most
``max_inflight_per_actor`` calls per actor are outstanding, beyond that ``submit`` waits (backpressure). A call whose
actor dies (Ray restarts it, ``max_restarts``) or that runs past ``timeout_s`` (its actor is killed so that Ray
restarts it) is resubmitted, preferably to another actor, up to ``max_retries`` times; then its samples fail with the
reason. Seeds travel with the requests, so a retried sample decodes to the same image. Bad input fails only its own
sample. Metrics (Ray's Prometheus export): uniar_decoder_queue_depth, uniar_decoder_images,
uniar_decoder_failures, uniar_decoder_retries, uniar_decoder_images_per_s (per actor call) and
uniar_decoder_pool_images_per_s (per collected batch).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import ray
import torch

from actors.group import ActorGroup, counter_at_zero
from uniar_ray.config import DecoderConfig
from uniar_ray.decoder.pipeline import load_decoder
from uniar_ray.decoder.types import DecodeRequest, DecodeResult

logger = logging.getLogger(__name__)


@ray.remote
class DecoderActor:
    """Owns one decoder (model on its device) and decodes the requests of one call."""

    def __init__(self, cfg: DecoderConfig):
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.decoder = load_decoder(cfg)
        from ray.util.metrics import Counter, Gauge

        self._images_per_s = Gauge("uniar_decoder_images_per_s", description="images decoded per second (last call)")
        self._images = Counter("uniar_decoder_images", description="images decoded")

    def ready(self) -> bool:
        return True

    def decode(self, requests: list[DecodeRequest], upsampling_ratio: float, num_inference_steps: int,
               guidance_scale: float) -> list[DecodeResult]:
        t0 = time.perf_counter()
        out = self.decoder.decode_requests(requests, upsampling_ratio, num_inference_steps, guidance_scale)
        done = sum(r.ok for r in out)
        if done:
            self._images.inc(done)
            self._images_per_s.set(done / max(time.perf_counter() - t0, 1e-9))
        return out


@dataclasses.dataclass
class _Call:
    ticket: int
    positions: list[int]  # where this call's requests sit in the ticket
    requests: list[DecodeRequest]
    kwargs: dict[str, Any]
    actor: int
    deadline: float
    attempts: int


@dataclasses.dataclass
class _Ticket:
    results: list[DecodeResult | None]
    pending: int
    started: float


class DecoderPool:
    """The actors of one ``DecoderConfig`` and the calls in flight across them (driver side, single-threaded)."""

    def __init__(self, cfg: DecoderConfig):
        self.cfg = cfg
        options = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus, "max_restarts": cfg.max_restarts,
                   "max_task_retries": 0}  # retries are ours: they can move to another actor and are counted
        self.actors = ActorGroup(DecoderActor, cfg.num_actors, options, cfg).actors
        self._calls: dict[ray.ObjectRef, _Call] = {}
        self._load = [0] * len(self.actors)  # outstanding calls per actor
        self._tickets: dict[int, _Ticket] = {}
        self._next_ticket = 0
        self._turn = 0
        self.peak_inflight = 0  # most calls outstanding at once (tests check the backpressure bound)
        self.stats = {"images": 0, "failures": 0, "retries": 0}
        from ray.util.metrics import Counter, Gauge

        self._queue_depth = Gauge("uniar_decoder_queue_depth", description="requests sent to decoder actors, not back")
        self._failures = counter_at_zero(Counter("uniar_decoder_failures", description="samples that got no image"))
        self._retries = counter_at_zero(Counter("uniar_decoder_retries",
                                                description="decoder calls resubmitted (lost or timed out)"))
        self._pool_rate = Gauge("uniar_decoder_pool_images_per_s", description="images per second, last batch")

    @property
    def capacity(self) -> int:
        return self.cfg.max_inflight_per_actor * len(self.actors)

    @property
    def inflight_per_actor(self) -> list[int]:
        return list(self._load)

    @property
    def queue_depth(self) -> int:
        return sum(len(c.requests) for c in self._calls.values())

    def wait_ready(self, timeout_s: float | None = None) -> None:
        ray.get([a.ready.remote() for a in self.actors], timeout=timeout_s)

    # ------------------------------------------------------------------------------------------------------------
    # submit / collect
    # ------------------------------------------------------------------------------------------------------------

    def submit(self, requests: Sequence[DecodeRequest], upsampling_ratio: float | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None) -> int:
        """Send the requests out in calls of ``max_batch``; returns a ticket for ``collect``. Waits while
        ``max_inflight_per_actor x num_actors`` calls are outstanding. The arguments fill the fields a request
        leaves None (then the config's defaults do)."""
        c = self.cfg
        kwargs = {"upsampling_ratio": c.upsampling_ratio if upsampling_ratio is None else upsampling_ratio,
                  "num_inference_steps": c.num_inference_steps if num_inference_steps is None else num_inference_steps,
                  "guidance_scale": c.guidance_scale if guidance_scale is None else guidance_scale}
        requests = list(requests)
        ticket = self._next_ticket
        self._next_ticket += 1
        self._tickets[ticket] = _Ticket([None] * len(requests), len(requests), time.monotonic())
        for start in range(0, len(requests), c.max_batch):
            while len(self._calls) >= self.capacity:
                self._poll()
            positions = list(range(start, min(start + c.max_batch, len(requests))))
            self._dispatch(ticket, positions, [requests[i] for i in positions], kwargs, attempts=1)
        return ticket

    def collect(self, ticket: int, timeout_s: float | None = None) -> list[DecodeResult]:
        """Wait for every request of ``ticket``; results in submission order (image, or error text)."""
        t = self._tickets[ticket]
        end = None if timeout_s is None else time.monotonic() + timeout_s
        while t.pending:
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise TimeoutError(f"decoder ticket {ticket}: {t.pending} of {len(t.results)} results still pending")
            if not self._calls:  # nothing in flight can deliver them (the pool was shut down): never spin
                raise RuntimeError(f"decoder ticket {ticket}: {t.pending} of {len(t.results)} results pending and "
                                   "no call in flight (the decoder pool was shut down)")
            self._poll(left)
        del self._tickets[ticket]
        done = sum(r.ok for r in t.results)
        self._pool_rate.set(done / max(time.monotonic() - t.started, 1e-9))
        return list(t.results)

    def decode_requests(self, requests: Sequence[DecodeRequest], upsampling_ratio: float | None = None,
                        num_inference_steps: int | None = None, guidance_scale: float | None = None
                        ) -> list[DecodeResult]:
        if not requests:
            return []
        return self.collect(self.submit(requests, upsampling_ratio, num_inference_steps, guidance_scale))

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors, self._calls, self._load = [], {}, []

    # ------------------------------------------------------------------------------------------------------------
    # internals
    # ------------------------------------------------------------------------------------------------------------

    def _dispatch(self, ticket: int, positions: list[int], requests: list[DecodeRequest], kwargs: dict,
                  attempts: int, avoid: int | None = None) -> None:
        n = len(self.actors)
        candidates = [i for i in range(n) if i != avoid] or list(range(n))
        actor = min(candidates, key=lambda i: (self._load[i], (i - self._turn) % n))
        self._turn += 1
        # the timeout counts from when the actor can start the call, not from when it was queued behind others
        deadline = time.monotonic() + self.cfg.timeout_s * (1 + self._load[actor])
        ref = self.actors[actor].decode.remote(requests, **kwargs)
        self._calls[ref] = _Call(ticket, positions, requests, kwargs, actor, deadline, attempts)
        self._load[actor] += 1
        self.peak_inflight = max(self.peak_inflight, len(self._calls))
        self._queue_depth.set(self.queue_depth)

    def _poll(self, timeout_s: float | None = None) -> None:
        """Wait for the next finished call (or the next deadline) and handle what is done or overdue."""
        if not self._calls:
            return
        wait = max(0.0, min(c.deadline for c in self._calls.values()) - time.monotonic())
        if timeout_s is not None:
            wait = min(wait, max(0.0, timeout_s))
        refs = list(self._calls)
        ready, rest = ray.wait(refs, num_returns=1, timeout=wait)
        if ready and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        for ref in ready:
            self._finish(ref)
        now = time.monotonic()
        for ref in [r for r, c in self._calls.items() if c.deadline <= now]:
            self._expire(ref)
        self._queue_depth.set(self.queue_depth)

    def _finish(self, ref: ray.ObjectRef) -> None:
        call = self._pop(ref)
        try:
            results = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the decoder itself raised for the whole call
            self._retry(call, f"decoder raised: {type(e.cause).__name__}: {str(e.cause)[:300]}")
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            self._retry(call, f"decoder actor lost: {type(e).__name__}")
        except Exception as e:  # noqa: BLE001 - object lost, worker crash: this call fails, not the batch
            self._retry(call, f"{type(e).__name__}: {str(e)[:300]}")
        else:
            self._deliver(call, results)

    def _expire(self, ref: ray.ObjectRef) -> None:
        call = self._pop(ref)
        logger.warning("decoder call of %d requests timed out on actor %d; restarting it", len(call.requests),
                       call.actor)
        ray.kill(self.actors[call.actor], no_restart=False)  # Ray restarts it (max_restarts); its result is dropped
        self._retry(call, f"timed out after {self.cfg.timeout_s:.0f}s")

    def _retry(self, call: _Call, reason: str) -> None:
        if call.attempts > self.cfg.max_retries:
            logger.error("decoder call failed after %d attempts: %s", call.attempts, reason)
            self._deliver(call, [DecodeResult(r.request_id, None, f"{reason} (after {call.attempts} attempts)")
                                 for r in call.requests])
            return
        logger.warning("decoder call retried (attempt %d): %s", call.attempts + 1, reason)
        self.stats["retries"] += 1
        self._retries.inc()
        self._dispatch(call.ticket, call.positions, call.requests, call.kwargs, call.attempts + 1, avoid=call.actor)

    def _pop(self, ref: ray.ObjectRef) -> _Call:
        call = self._calls.pop(ref)
        self._load[call.actor] -= 1
        return call

    def _deliver(self, call: _Call, results: list[DecodeResult]) -> None:
        if len(results) != len(call.requests):  # never expected; fail loudly per sample rather than misalign
            results = [DecodeResult(r.request_id, None, f"decoder returned {len(results)} results for "
                                    f"{len(call.requests)} requests") for r in call.requests]
        t = self._tickets[call.ticket]
        failures = 0
        for pos, res in zip(call.positions, results):
            res.attempts = call.attempts
            failures += not res.ok
            t.results[pos] = res
        t.pending -= len(results)
        self.stats["images"] += len(results) - failures
        self.stats["failures"] += failures
        if failures:
            self._failures.inc(failures)
