"""MasterWeightAdamW: torch AdamW (with clipping) in fp32, fp32 masters that keep sub-ulp updates in bf16, in-place
updates that keep the parameters' storage and move their version counters."""
from __future__ import annotations

import copy

import pytest
import torch

from uniar_ray.model.tiny import build_tiny_policy
from uniar_ray.optim import MasterWeightAdamW, _buckets


def _loss(model, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 300, (2, 7), generator=g)
    h = model.model.language_model.embed_tokens(ids) * 20  # O(1) states, so the head's RMSNorm passes gradients
    for layer in model.visual_decoder:
        h = h + layer.mlp(h)
    return model.head_logits(h).float().pow(2).mean()


def _grads(model, seed: int) -> None:
    _loss(model, seed).backward()


@pytest.mark.parametrize("bucket_numel", [1, 1 << 30])
def test_matches_torch_adamw_with_clipping_in_fp32(bucket_numel):
    ref = build_tiny_policy(0)
    ours = copy.deepcopy(ref)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ref_params = [p for p in ref.parameters()]
    torch_opt = torch.optim.AdamW(ref_params, **kw)
    params = [p for p in ours.parameters()]
    ptrs = [p.data_ptr() for p in params]
    opt = MasterWeightAdamW(params, max_grad_norm=0.05, bucket_numel=bucket_numel, **kw)
    for step in range(3):
        _grads(ref, step)
        want_norm = torch.nn.utils.clip_grad_norm_(ref_params, 0.05)
        torch_opt.step()
        torch_opt.zero_grad()
        _grads(ours, step)
        norm = opt.step()
        opt.zero_grad()
        assert norm == pytest.approx(float(want_norm), rel=1e-5)
        assert norm > 0.05  # the clipping acted
    for (name, a), b in zip(ref.named_parameters(), ours.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
    assert [p.data_ptr() for p in params] == ptrs  # updated in place


def test_bf16_params_follow_the_fp32_master_in_place():
    """An update below half a bf16 ulp vanishes in a bf16 AdamW; the master accumulates it until the bf16 copy moves."""
    p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    plain = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
    opt = MasterWeightAdamW([p], lr=1e-4)
    plain_opt = torch.optim.AdamW([plain], lr=1e-4, weight_decay=0.0)
    opt.opt.param_groups[0]["weight_decay"] = 0.0
    ptr, version = p.data_ptr(), p._version
    for _ in range(60):  # Adam's first steps move each weight by ~lr: 60 x 1e-4 = 6e-3 > half the ulp below 1
        p.grad = torch.ones_like(p)
        plain.grad = torch.ones_like(plain)
        opt.step()
        plain_opt.step()
    assert torch.equal(plain, torch.ones_like(plain))  # every bf16 update rounded away
    assert float(opt.masters[0][0]) == pytest.approx(1 - 6e-3, rel=1e-3)
    assert torch.equal(p, opt.masters[0].to(torch.bfloat16)) and float(p[0].detach()) < 1.0
    assert p.dtype == torch.bfloat16 and p.data_ptr() == ptr and p._version > version
    assert opt.state_bytes() == {"master": 16, "moments": 32}


def test_parameters_without_gradients_are_left_alone():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = MasterWeightAdamW([a, b], lr=0.1)
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and float(a[0].detach()) < 1.0
    assert opt.opt.state[opt.masters[1]] == {}


def test_buckets_bound_the_fp32_gradients():
    assert _buckets([5, 5, 5, 20, 1], 10) == [[0, 1], [2], [3], [4]]
    with pytest.raises(ValueError, match="no parameters"):
        MasterWeightAdamW([])
