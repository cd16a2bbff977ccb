"""A reward served over HTTP (``backend: http``): your own reward server, in whatever environment it needs, spoken
to with a JSON protocol (no pickle: nothing the server sends can run code here, and the reverse).

    POST <url>   Content-Type: application/json   [Authorization: Bearer <token>]
    {"prompts": [str], "images": [base64 PNG or JPEG], "tasks": [str], "metadata": [object]}
    -> 200 {"scores": [number | null], "details": [object | null] (optional)}

One entry per sample, in order; ``tasks[i]`` is "" when the prompt has none; ``null`` = not applicable (or failed:
give a reason as ``details[i].error``, then the sample counts as failed). Up to ``batch_size`` samples per POST,
``concurrency`` POSTs in flight per actor, each bounded by ``request_timeout_s`` and retried ``retries`` times
(waiting ``retry_backoff_s`` x k before retry k) on a connection error, a timeout, HTTP 429 or 5xx. Other 4xx
answers and protocol errors (not JSON, no "scores", the wrong number of them) are not retried. Samples whose POST
failed score NaN with the reason, naming the URL: counted in the failure budget, never trained on. Proxy
environment variables are not used (reward servers are on the cluster's network).

    reward = HttpReward("aesthetic", "http://10.0.0.5:8000/score", image_format="jpeg", jpeg_quality=75)
"""
from __future__ import annotations

import base64
import json
import logging
import math
import os
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rewards.base import RewardBatch, RewardScores, encode_image

logger = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 2**20


class ProtocolError(ValueError):
    """The server answered, but not with the protocol's JSON: not retried."""


class _Retryable(Exception):
    """A failure worth another try: no connection, no answer in time, HTTP 429 or 5xx."""


class HttpReward:
    name = "http"
    tasks = None
    inputs = "pixels"
    encodes_images = True  # the actor passes the decoded pixels; this encodes them once, at image_format

    def __init__(self, name: str, url: str, image_format: str = "png", jpeg_quality: int = 75, batch_size: int = 16,
                 request_timeout_s: float = 120.0, retries: int = 2, retry_backoff_s: float = 5.0,
                 concurrency: int = 4, token_env: str = "", sleep=time.sleep):
        self.name, self.url, self.image_format, self.jpeg_quality = name, url, image_format, jpeg_quality
        self.batch_size, self.request_timeout_s, self.retries = batch_size, request_timeout_s, retries
        self.retry_backoff_s, self.concurrency, self.sleep = retry_backoff_s, concurrency, sleep
        self.headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if token_env:
            token = os.environ.get(token_env)
            if not token:
                raise RuntimeError(f"reward {name}: token_env={token_env}, but {token_env} is not set in this reward "
                                   "actor's environment (set it on every node, or in the reward's "
                                   "runtime_env.env_vars)")
            self.headers["Authorization"] = f"Bearer {token}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @classmethod
    def from_spec(cls, name: str, spec) -> HttpReward:
        return cls(name, spec.url, spec.image_format, spec.jpeg_quality or 75, spec.batch_size, spec.request_timeout_s,
                   spec.retries, spec.retry_backoff_s, spec.concurrency, spec.token_env)

    def score(self, batch: RewardBatch) -> RewardScores:
        n = len(batch)
        starts = list(range(0, n, self.batch_size))
        parts = [batch.select(range(s, min(s + self.batch_size, n))) for s in starts]
        with ThreadPoolExecutor(max_workers=max(1, min(self.concurrency, len(parts)))) as pool:
            results = list(pool.map(self._call, parts))
        failed = {r.errors[0] for r in results if r.errors and all(e is not None for e in r.errors)}
        for reason in failed:  # one line per distinct failure of this batch
            logger.warning("reward %s: %s", self.name, reason)
        return RewardScores(np.concatenate([r.scores for r in results]) if results else np.zeros(0),
                            [e for r in results for e in r.errors], details=[d for r in results for d in r.details])

    # ------------------------------------------------------------------------------------------------------------
    def request_body(self, batch: RewardBatch) -> bytes:
        images = [base64.b64encode(encode_image(im, self.image_format, self.jpeg_quality)).decode("ascii")
                  for im in batch.images]
        return json.dumps({"prompts": list(batch.prompts), "images": images,
                           "tasks": [t or "" for t in batch.tasks], "metadata": list(batch.metadata)}).encode()

    def _call(self, batch: RewardBatch) -> RewardScores:
        body, n = self.request_body(batch), len(batch)
        attempts = self.retries + 1
        for attempt in range(attempts):
            if attempt:
                self.sleep(self.retry_backoff_s * attempt)
            try:
                return parse_answer(self._post(body), n)
            except ProtocolError as e:
                return RewardScores.failed(n, f"POST {self.url}: bad answer: {e}")
            except _Retryable as e:
                reason = str(e)
                if attempt + 1 < attempts:
                    logger.info("reward %s: POST %s: %s; retrying", self.name, self.url, reason)
        tries = f"{attempts} tries" if attempts > 1 else "1 try"
        return RewardScores.failed(n, f"POST {self.url} failed after {tries}: {reason}")

    def _post(self, body: bytes) -> bytes:
        """The answer's body, within ``request_timeout_s`` in all (also against a server that trickles bytes)."""
        req = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        deadline = time.monotonic() + self.request_timeout_s
        try:
            with self.opener.open(req, timeout=self.request_timeout_s) as resp:
                chunks, size = [], 0
                while chunk := resp.read(1 << 16):
                    chunks.append(chunk)
                    size += len(chunk)
                    if size > MAX_ANSWER_BYTES:
                        raise ProtocolError(f"answer over {MAX_ANSWER_BYTES} bytes")
                    if time.monotonic() > deadline:
                        raise _Retryable(f"no complete answer within request_timeout_s={self.request_timeout_s:g}")
                return b"".join(chunks)
        except urllib.error.HTTPError as e:
            text = " ".join(e.read(300).decode("utf-8", "replace").split())[:200]
            reason = f"HTTP {e.code}" + (f" ({text})" if text else "")
            if e.code == 429 or e.code >= 500:
                raise _Retryable(reason) from None
            raise ProtocolError(reason) from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no answer within request_timeout_s={self.request_timeout_s:g}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, (TimeoutError, socket.timeout)):
                raise _Retryable(f"no answer within request_timeout_s={self.request_timeout_s:g}") from None
            raise _Retryable(f"cannot connect ({e.reason})") from None
        except (ConnectionError, OSError) as e:  # reset mid-answer, broken pipe
            raise _Retryable(f"connection failed ({type(e).__name__}: {e})") from None


def parse_answer(raw: bytes, n: int) -> RewardScores:
    """The protocol's answer for ``n`` samples -> scores (null = NaN), per-sample errors (``details[i].error``,
    a non-finite number) and details; a ProtocolError for anything else."""
    try:
        obj = json.loads(raw)
    except ValueError:
        raise ProtocolError(f"not JSON: {raw[:80]!r}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("scores"), list):
        raise ProtocolError('expected a JSON object with a "scores" list')
    values, details = obj["scores"], obj.get("details")
    if len(values) != n:
        raise ProtocolError(f"{len(values)} scores for {n} images")
    if details is None:
        details = [None] * n
    elif not isinstance(details, list) or len(details) != n or any(d is not None and not isinstance(d, dict)
                                                                   for d in details):
        raise ProtocolError(f'"details" must be a list of {n} objects (or null)')
    scores = np.full(n, math.nan)
    errors: list[str | None] = [None] * n
    for i, v in enumerate(values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ProtocolError(f"score {i} is {v!r}, expected a number or null")
        if v is not None and not math.isfinite(v):
            errors[i] = f"non-finite score {v}"
        elif v is not None:
            scores[i] = float(v)
        err: Any = (details[i] or {}).get("error")
        if err:
            errors[i] = f"server: {str(err)[:200]}"
    return RewardScores(scores, errors, details=details)
