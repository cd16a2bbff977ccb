"""A group of identical actors and the two ways the jobs call them: everyone the same args, or a list split across.

    group = ActorGroup(RolloutEngineActor, 2, {"num_cpus": 1}, model_cfg)
    results = group.map("generate", requests)      # requests split evenly, results back in request order
    ray.get(group.broadcast("update_weights", state_ref))
"""
from __future__ import annotations

from typing import Any

import ray


class ActorGroup:
    def __init__(self, actor_cls, count: int, options: dict[str, Any] | None, *args, **kwargs):
        if count < 1:
            raise ValueError(f"an actor group needs at least one actor, got {count}")
        self.actors = [actor_cls.options(**(options or {})).remote(*args, **kwargs) for _ in range(count)]

    def __len__(self) -> int:
        return len(self.actors)

    def broadcast(self, method: str, *args, **kwargs) -> list[ray.ObjectRef]:
        return [getattr(a, method).remote(*args, **kwargs) for a in self.actors]

    def map(self, method: str, items: list, *args, timeout_s: float | None = None, **kwargs) -> list:
        """Split ``items`` into contiguous shards (one per actor), call ``method(shard, ...)``, concatenate.
        ``timeout_s``: how long to wait for all of them (``ray.exceptions.GetTimeoutError`` past it)."""
        shards = split_even(items, len(self.actors))
        refs = [getattr(a, method).remote(s, *args, **kwargs) for a, s in zip(self.actors, shards) if s]
        out = []
        for part in ray.get(refs, timeout=timeout_s):
            out.extend(part)
        return out


def split_even(items: list, parts: int) -> list[list]:
    """Contiguous shards whose sizes differ by at most one (groups of G stay together when G divides the size)."""
    q, r = divmod(len(items), parts)
    shards, start = [], 0
    for i in range(parts):
        end = start + q + (1 if i < r else 0)
        shards.append(items[start:end])
        start = end
    return shards


def counter_at_zero(counter, tags: dict[str, str] | None = None):
    """Export a ``ray.util.metrics.Counter`` at 0 before its first event, as Prometheus advises: ``rate()`` and
    ``increase()`` over it then have a series, and a failures panel shows 0 instead of "no data" (``Counter.inc``
    refuses 0; recording 0 adds nothing)."""
    counter._record(0.0, tags=tags)
    return counter
