"""mmvl.ops.attention on CUDA: xformers, SDPA and the math path agree in float32 and bfloat16, forward and
backward, with masks, alone and inside the 2D (timm) and 3D (MONAI) ViTs. Skipped without CUDA (CI); run by
benchmarks/gpu_check.py on a GPU machine."""

from __future__ import annotations

import copy

import pytest
import torch

from mmvl.ops import attention, available_backends, current_backend, patch_attention
from tests.ops.test_attention import make_mask, qkv, summation_tolerance, tiny_vit

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

FUSED = ["sdpa", "xformers"]  # compared with "math", which materialises the scores (the reference)
MASKS = [None, "bool", "additive", "key_padding"]
SHAPE = dict(batch=2, heads=3, n_query=77, n_key=77)  # 77: not a multiple of 8, so xformers pads its bias
HEAD_DIM = 64
EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 7.8e-3

# Tolerances, by dtype.
# float32: both sides sum in float32 in different orders (Higham's bound, as tests/ops/test_attention.py: eps times
# the longest sum times the stacked sums, scaled by the reference's largest value); the fused CUDA kernels also take
# exp from the hardware's approximate exp2 (a few ulp per weight), so the stacked sums are counted twice over.
# bfloat16 on bfloat16 inputs: every kernel accumulates in float32 and differs only in where it rounds to bfloat16
# (flash/memory-efficient: the weights before P @ V and the output; math: scores, weights and output), so the bound
# counts roundings (eps_bf16 each) rather than sums: 4 in the forward; the backward subtracts (dS = P * (dP - D)),
# which can cancel, so 16 there. A wrong mask, scale or head split moves results by a large part of their size.


def fp32_tolerance(reference: torch.Tensor, depth: int) -> dict[str, float]:
    return summation_tolerance(reference, reduction=max(HEAD_DIM, SHAPE["n_key"]), depth=2 * depth)


def bf16_tolerance(reference: torch.Tensor, roundings: int) -> dict[str, float]:
    bound = EPS_BF16 * roundings
    return dict(atol=bound * reference.detach().abs().max().item(), rtol=bound)


def needs(backend: str) -> None:
    if backend not in available_backends("cuda"):
        pytest.skip(f"{backend} does not run here (xformers comes with the '.[gpu]' extra, built for this torch)")


def forward_and_grads(q, k, v, mask, backend):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, mask=mask, backend=backend)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    grads = torch.autograd.grad((out.float() * weights).sum(), (q, k, v))
    return (out.float(), *(g.float() for g in grads))


def cuda_inputs(kind, dtype):
    q, k, v = (t.cuda() for t in qkv(**SHAPE, dim=HEAD_DIM, dim_v=HEAD_DIM, dtype=dtype))
    mask = make_mask(kind, **SHAPE)
    return q, k, v, None if mask is None else mask.cuda()


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("backend", FUSED)
def test_fused_matches_math_float32(backend, kind):
    needs(backend)
    q, k, v, mask = cuda_inputs(kind, torch.float32)
    fused, reference = forward_and_grads(q, k, v, mask, backend), forward_and_grads(q, k, v, mask, "math")
    torch.testing.assert_close(fused[0], reference[0], **fp32_tolerance(reference[0], depth=2))
    for name, a, b in zip("qkv", fused[1:], reference[1:]):  # two sums forward, two more backward
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"grad {n}: {m}", **fp32_tolerance(b, depth=4))


@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("backend", [*FUSED, "math"])
def test_bfloat16_matches_float32_math(backend, kind):
    """Each backend on bfloat16 inputs against the exact result: the math path in float32 on the same values."""
    needs(backend)
    q, k, v, mask = cuda_inputs(kind, torch.bfloat16)
    low = forward_and_grads(q, k, v, mask, backend)
    exact = forward_and_grads(q.float(), k.float(), v.float(), mask, "math")
    assert attention(q, k, v, mask=mask, backend=backend).dtype == torch.bfloat16
    torch.testing.assert_close(low[0], exact[0], **bf16_tolerance(exact[0], roundings=4))
    for name, a, b in zip("qkv", low[1:], exact[1:]):
        torch.testing.assert_close(a, b, msg=lambda m, n=name: f"grad {n}: {m}", **bf16_tolerance(b, roundings=16))


def test_automatic_choice_on_cuda():
    backend = current_backend("cuda", torch.bfloat16)
    assert backend == ("xformers" if "xformers" in available_backends("cuda") else "sdpa")


def outputs_and_grads(model, x, first_output):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = model(x)
    out = out[0] if first_output else out
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    (out.float() * weights).sum().backward()
    grads = {name: p.grad.float().clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach().float(), x.grad.float(), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("backend", ["sdpa", "math", "xformers"])
@pytest.mark.parametrize("family", ["timm", "monai"])
def test_patched_vit_matches_the_library_on_cuda(monkeypatch, family, backend, dtype):
    """The 2D and 3D ViTs with mmvl's attention give the library's own outputs and gradients on CUDA (float32), and
    under bfloat16 autocast stay within bfloat16 roundings of them."""
    needs(backend)
    monkeypatch.setenv("MMVL_ATTENTION", backend)
    reference, x = tiny_vit(family)
    reference, x = reference.cuda(), x.cuda()
    model = copy.deepcopy(reference)
    assert patch_attention(model) == 2
    first_output = family == "monai"  # MONAI's ViT returns (tokens, hidden states)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is torch.bfloat16):
        expected = outputs_and_grads(reference, x, first_output)
        found = outputs_and_grads(model, x, first_output)
    reduction = {"timm": 256, "monai": 128}[family]  # the MLP's hidden width; two blocks
    if dtype is torch.float32:
        torch.testing.assert_close(found[0], expected[0], **summation_tolerance(expected[0], reduction, 4))
        torch.testing.assert_close(found[1], expected[1], **summation_tolerance(expected[1], reduction, 8))
        assert found[2].keys() == expected[2].keys() and expected[2]
        for name, grad in expected[2].items():
            torch.testing.assert_close(found[2][name], grad, msg=lambda m, n=name: f"{n}: {m}",
                                       **summation_tolerance(grad, reduction, 8))
    else:  # every linear layer rounds to bfloat16 on both sides (about ten per block): roundings, not sums
        torch.testing.assert_close(found[0], expected[0], **bf16_tolerance(expected[0], roundings=8))
        torch.testing.assert_close(found[1], expected[1], **bf16_tolerance(expected[1], roundings=16))
        assert all(torch.isfinite(g).all() for g in found[2].values())
