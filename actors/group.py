"""A group of identical actors and the two ways the jobs call them: everyone the same args, or a list split across.

    group = ActorGroup(RolloutEngineActor, 2, {"num_cpus": 1}, model_cfg)
    results = group.map("generate", requests)      # requests split evenly, results back in request order
    ray.get(group.broadcast("update_weights", state_ref))
"""
from __future__ import annotations

from typing import Any, Callable

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

    def map(self, method: str, items: list, *args, timeout_s: float | None = None,
            on_error: Callable[[BaseException, list], list] | None = None, **kwargs) -> list:
        """Split ``items`` into contiguous shards (one per actor), call ``method(shard, ...)``, concatenate.
        ``timeout_s``: how long to wait for all of them (``ray.exceptions.GetTimeoutError`` past it).
        ``on_error(error, shard)``: the results that stand for a shard whose call failed (its actor died past its
        restarts, or the method raised), so the other shards' results are kept; without it the error is raised."""
        shards = [s for s in split_even(items, len(self.actors)) if s]
        refs = [getattr(a, method).remote(s, *args, **kwargs) for a, s in zip(self.actors, shards)]
        return gather(refs, shards, timeout_s, on_error)


def gather(refs: list, shards: list[list], timeout_s: float | None = None,
           on_error: Callable[[BaseException, list], list] | None = None) -> list:
    """The shards' results in order (see ``ActorGroup.map``); a wait past ``timeout_s`` always raises."""
    if on_error is None:
        return [x for part in ray.get(refs, timeout=timeout_s) for x in part]
    ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    out = []
    for ref, shard in zip(refs, shards):
        try:
            out.extend(ray.get(ref, timeout=0 if timeout_s is not None else None))
        except ray.exceptions.GetTimeoutError:
            raise
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError, ray.exceptions.WorkerCrashedError) as e:
            out.extend(on_error(e, shard))
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
