"""vLLM scheduler that keeps the conditional and unconditional rows of a CFG sample in step.

Passed to vLLM as ``LLM(scheduler_cls="uniar_ray.rollout.vllm_engine.scheduler.UniARScheduler")``. vLLM's own
scheduler knows nothing of pairs: it may admit, budget or preempt one row of a sample without the other, and a row
that runs ahead would need bits that cannot be drawn yet (the draw needs both rows' logits).
"""
from __future__ import annotations

import time

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus


def _uniar(request: Request) -> dict | None:
    params = request.sampling_params
    return (params.extra_args or {}).get("uniar") if params is not None else None


class UniARScheduler(Scheduler):
    """Four rules on top of vLLM's scheduler (everything else is stock):

    1. Admission together: a CFG row is held back until its partner arrives, then both enter the waiting queue
       side by side (``LLM.enqueue`` adds requests one at a time, so a step could otherwise start with one).
    2. Never ahead: a row that has more tokens than its partner (it sampled while the partner was preempted or
       still prefilling; the runner left its logits pending) is hidden from the step until the partner catches up,
       so it is neither scheduled nor chosen as a preemption victim.
    3. Preempted together: when only such held rows are running and their partners wait for KV space, the held
       rows are preempted too, so the partner can be admitted (otherwise nothing could ever run).
    4. Aborted together: aborting one row aborts its partner (alone it would wait forever).

    A row can still end one step before its partner (when it drew its last logits alone); the runner then draws the
    sample's last bits when the partner's logits arrive and emits the payload on the partner.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._arrived: dict[str, Request] = {}  # sample key -> the first row of a pair, waiting for its partner
        self._pairs: dict[str, tuple[Request, Request]] = {}  # sample key -> (cond, uncond)

    def add_request(self, request: Request) -> None:
        extra = _uniar(request)
        if extra is None or "uncond" not in extra["roles"]:
            return super().add_request(request)
        first = self._arrived.pop(extra["key"], None)
        if first is None:
            self._arrived[extra["key"]] = request
            return None
        pair = (first, request) if extra["role"] == "uncond" else (request, first)
        self._pairs[extra["key"]] = pair
        for r in pair:
            super().add_request(r)
        return None

    def finish_requests(self, request_ids, finished_status):
        # An abort before the partner arrived: the held row is not in vLLM's queues, so drop it here (None: all).
        ids = {request_ids} if isinstance(request_ids, str) else None if request_ids is None else set(request_ids)
        for key, r in list(self._arrived.items()):
            if ids is None or r.request_id in ids:
                del self._arrived[key]
        if ids is not None:  # a row alone can never complete its sample: abort its partner with it
            partners = {b.request_id for c, u in self._pairs.values() for a, b in ((c, u), (u, c))
                        if a.request_id in ids and not b.is_finished()}
            request_ids = sorted(ids | partners)
        return super().finish_requests(request_ids, finished_status)

    def schedule(self, *args, **kwargs):
        ahead = self._rows_ahead()
        if not ahead:
            return super().schedule(*args, **kwargs)
        running = list(self.running)
        if all(r in ahead for r in running):
            self._preempt_held(ahead)
            running = list(self.running)
        waiting = [r for r in self.waiting if r in ahead]
        self.running = [r for r in running if r not in ahead]
        self.waiting.remove_requests(waiting)
        limits = self.max_num_running_reqs, self.max_num_active_reqs
        held = len(running) - len(self.running)  # held rows still occupy a running slot
        self.max_num_running_reqs, self.max_num_active_reqs = limits[0] - held, limits[1] - held
        try:
            return super().schedule(*args, **kwargs)
        finally:
            self.max_num_running_reqs, self.max_num_active_reqs = limits
            # Back in their places: vLLM's own order (and so its choice of preemption victims) is unchanged.
            now, before = set(self.running), set(running)
            self.running = [r for r in running if r in ahead or r in now] + [r for r in self.running
                                                                               if r not in before]
            for r in reversed(waiting):
                self.waiting.prepend_request(r)

    def _rows_ahead(self) -> set[Request]:
        ahead = set()
        for key, (c, u) in list(self._pairs.items()):
            if c.is_finished() and u.is_finished():
                del self._pairs[key]
            elif c.num_output_tokens != u.num_output_tokens:
                ahead.add(c if c.num_output_tokens > u.num_output_tokens else u)
        return ahead

    def _preempt_held(self, ahead: set[Request]) -> None:
        partner = {a: b for c, u in self._pairs.values() for a, b in ((c, u), (u, c))}
        for r in list(self.running):
            if r in ahead and partner[r].status != RequestStatus.RUNNING:
                self.running.remove(r)
                self._preempt_request(r, time.monotonic())
